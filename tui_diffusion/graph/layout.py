"""Where the graph view draws each node and link: a pure function of the workflow, in character cells.

Nodes go in columns by depth, ComfyUI's left-to-right reading order: a node's column is one more than
the deepest column among the sources of its inputs. Links run between adjacent columns only: a link
that spans several columns passes through the columns in between on a row of its own (a one-row
"pass-through", the dummy node of a layered graph drawing), so every piece of a route is a horizontal
stub out of a port, a vertical run in a lane of the gap between two columns, and a stub into the next
port. One output feeding several inputs shares its pass-throughs and its lane (drawn as a branching
line). Lanes are chosen so that two different links never run along the same cells; they only cross.

Torch-free and widget-free: the widget rasterises what this returns, and tests check it directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.workflow import Workflow

BOX_WIDTH = 22  # title and class get BOX_WIDTH - 2 cells
MIN_GAP = 4  # columns between two node columns when no link needs a lane there
ROW_GAP = 1  # empty rows between two items of a column
MARGIN = 1
SWEEPS = 8

Direction = Literal["up", "down", "left", "right"]


@dataclass(frozen=True)
class NodeBox:
    """A node's box: its top-left corner, size and the rows its linked ports sit on."""

    node_id: str
    title: str
    class_type: str
    column: int
    x: int
    y: int
    width: int
    height: int
    #: linked inputs in the node's declared order; input i enters on row ``y + 1 + i``
    inputs: tuple[str, ...]
    #: used output indexes in order; output slot j leaves on row ``y + 1 + j``
    outputs: tuple[int, ...]

    def input_row(self, name: str) -> int:
        return self.y + 1 + self.inputs.index(name)

    def output_row(self, index: int) -> int:
        return self.y + 1 + self.outputs.index(index)

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2

    def contains(self, x: int, y: int) -> bool:
        return self.x <= x < self.x + self.width and self.y <= y < self.y + self.height


@dataclass(frozen=True)
class LinkRoute:
    """One link, from the cell right of the source's output port to the cell left of the target's input port.

    ``points`` are the corners of an orthogonal polyline (consecutive points share a row or a column).
    """

    source: str
    output_index: int
    target: str
    input_name: str
    type: str
    points: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class GraphLayout:
    boxes: dict[str, NodeBox]
    links: tuple[LinkRoute, ...]
    #: node ids per column, top to bottom
    columns: tuple[tuple[str, ...], ...]
    width: int
    height: int
    #: links that are not drawn: their source is missing, or they close a cycle (validation reports both)
    skipped: tuple[tuple[str, str], ...] = ()


# -- columns -------------------------------------------------------------------------------------------------
def node_columns(workflow: Workflow) -> dict[str, int]:
    """Each node's column: 0 for nodes without linked sources, else 1 + the deepest source's column.

    A cycle (an invalid workflow) is cut where the walk meets a node already on its path.
    """
    column: dict[str, int] = {}
    on_path: set[str] = set()

    def visit(node_id: str) -> int:
        if node_id in column:
            return column[node_id]
        on_path.add(node_id)
        deepest = -1
        for link in workflow.links(node_id).values():
            if link.node_id in workflow.nodes and link.node_id not in on_path:
                deepest = max(deepest, visit(link.node_id))
        on_path.discard(node_id)
        column[node_id] = deepest + 1
        return column[node_id]

    for node_id in workflow:
        visit(node_id)
    return column


def _linked_inputs(workflow: Workflow, node_id: str) -> list[tuple[str, str, int]]:
    """(input name, source id, output index) for each linked input, in the node's declared input order."""
    links = workflow.links(node_id)
    spec = get_spec(workflow.class_type(node_id))
    declared = [i.name for i in spec.inputs] if spec else []
    names = [n for n in declared if n in links] + [n for n in links if n not in declared]
    return [(n, links[n].node_id, links[n].output_index) for n in names]


def _output_type(workflow: Workflow, node_id: str, index: int) -> str:
    spec = get_spec(workflow.class_type(node_id))
    if spec and 0 <= index < len(spec.outputs):
        return spec.outputs[index].type
    return "*"


# -- the layout ------------------------------------------------------------------------------------------------
Net = tuple[str, int]  # (source node id, output index)
Item = tuple[Any, ...]  # ("node", node id) or ("pass", net, column)
Edge = tuple[Item, int, Item, int, Net]  # left item, its row offset, right item, its row offset, the net


def layout_graph(workflow: Workflow, box_width: int = BOX_WIDTH) -> GraphLayout:
    """Place every node and route every link of ``workflow``; deterministic for a given workflow."""
    col = node_columns(workflow)
    n_cols = max(col.values(), default=-1) + 1
    wf_nodes = list(workflow)

    # nets: one per used output, with the inputs it feeds
    targets: dict[Net, list[tuple[str, str]]] = defaultdict(list)
    inputs_of: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    for node_id in wf_nodes:
        names = []
        for name, src, index in _linked_inputs(workflow, node_id):
            if src not in workflow.nodes or col[src] >= col[node_id]:
                skipped.append((node_id, name))
                continue
            names.append(name)
            targets[(src, index)].append((node_id, name))
        inputs_of[node_id] = names
    outputs_of: dict[str, list[int]] = defaultdict(list)
    for src, index in sorted(targets, key=lambda n: n[1]):
        outputs_of[src].append(index)
    last_col = {net: max(col[t] for t, _ in ts) for net, ts in targets.items()}

    height_of: dict[Item, int] = {}
    for node_id in wf_nodes:
        ports = max(2, len(inputs_of[node_id]), len(outputs_of[node_id]))
        height_of[("node", node_id)] = ports + 2
    # items per column, first by node id; pass-throughs after the nodes
    order: list[list[Item]] = [[] for _ in range(n_cols)]
    for node_id in wf_nodes:
        order[col[node_id]].append(("node", node_id))
    for net in sorted(targets, key=lambda n: (wf_nodes.index(n[0]), n[1])):
        for k in range(col[net[0]] + 1, last_col[net]):
            order[k].append(("pass", net, k))
            height_of[("pass", net, k)] = 1

    # the connections between column k and k + 1: (left item, offset of its row, right item, offset)
    def port_offset_out(item: Item, net: Net) -> int:
        return 1 + outputs_of[net[0]].index(net[1]) if item[0] == "node" else 0

    gap_edges: list[list[Edge]] = [[] for _ in range(max(n_cols - 1, 0))]
    for net, ts in targets.items():
        src, _ = net
        for k in range(col[src], last_col[net]):
            left: Item = ("node", src) if k == col[src] else ("pass", net, k)
            left_off = port_offset_out(left, net)
            for target, name in ts:
                if col[target] == k + 1:
                    gap_edges[k].append((left, left_off, ("node", target), 1 + inputs_of[target].index(name), net))
            if k + 1 < last_col[net]:
                gap_edges[k].append((left, left_off, ("pass", net, k + 1), 0, net))

    _order_columns(order, gap_edges, height_of)
    y_of = _place_rows(order, gap_edges, height_of)
    _untangle(order, gap_edges, y_of)

    # lanes in each gap, then the x of each column
    gap_lanes: list[dict[Net, int]] = []
    gap_width: list[int] = []
    for edges in gap_edges:
        lanes = _assign_lanes(_gap_nets(edges, y_of))
        gap_lanes.append(lanes)
        gap_width.append(max(MIN_GAP, max(lanes.values(), default=-1) + 1 + 2))
    col_x = [MARGIN]
    for k in range(n_cols - 1):
        col_x.append(col_x[-1] + box_width + gap_width[k])

    boxes: dict[str, NodeBox] = {}
    for node_id in wf_nodes:
        item: Item = ("node", node_id)
        boxes[node_id] = NodeBox(node_id, workflow.title(node_id), workflow.class_type(node_id), col[node_id],
                                 col_x[col[node_id]], y_of[item], box_width, height_of[item],
                                 tuple(inputs_of[node_id]), tuple(outputs_of[node_id]))

    routes: list[LinkRoute] = []
    for net, ts in targets.items():
        src, index = net
        for target, name in ts:
            start = (boxes[src].x + box_width, boxes[src].output_row(index))
            points = [start]
            for k in range(col[src], col[target]):
                gap_left = col_x[k] + box_width
                y_left = points[-1][1]
                y_right = boxes[target].input_row(name) if k + 1 == col[target] else y_of[("pass", net, k + 1)]
                if y_right != y_left:
                    lane_x = gap_left + 1 + gap_lanes[k][net]
                    points += [(lane_x, y_left), (lane_x, y_right)]
                if k + 1 < col[target]:  # across the next column on the pass-through row
                    points.append((col_x[k + 1] + box_width, y_right))
                else:
                    points.append((col_x[k + 1] - 1, y_right))
            routes.append(LinkRoute(src, index, target, name, _output_type(workflow, src, index),
                                    tuple(_simplify(points))))

    columns = tuple(tuple(i[1] for i in items if i[0] == "node") for items in order)  # type: ignore[misc]
    width = (col_x[-1] + box_width + MARGIN) if n_cols else 0
    height = max((y + height_of[i] for i, y in y_of.items()), default=0) + MARGIN if n_cols else 0
    return GraphLayout(boxes, tuple(routes), columns, width, height, tuple(skipped))


def _simplify(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop repeated points and the middle of three collinear points."""
    out: list[tuple[int, int]] = []
    for p in points:
        if out and p == out[-1]:
            continue
        if len(out) >= 2 and (out[-2][0] == out[-1][0] == p[0] or out[-2][1] == out[-1][1] == p[1]):
            out[-1] = p
        else:
            out.append(p)
    return out


# -- order within columns: barycentre sweeps, keeping the order with the fewest crossings ----------------------------
def _order_columns(order: list[list[Item]], gap_edges: list[list[Edge]],
                   height_of: dict[Item, int]) -> None:
    def pos(k: int) -> dict[Item, int]:
        return {item: i for i, item in enumerate(order[k])}

    def frac(item: Item, offset: int) -> float:
        return offset / (height_of[item] + 1)

    def crossings() -> int:
        total = 0
        for k, edges in enumerate(gap_edges):
            left, right = pos(k), pos(k + 1)
            ends = [(left[a] + frac(a, ao), right[b] + frac(b, bo)) for a, ao, b, bo, _ in edges]
            for i in range(len(ends)):
                for j in range(i + 1, len(ends)):
                    if (ends[i][0] - ends[j][0]) * (ends[i][1] - ends[j][1]) < 0:
                        total += 1
        return total

    def sweep(k: int, neighbour: int) -> None:
        npos = pos(neighbour)
        here = pos(k)
        sums: dict[Item, list[float]] = defaultdict(list)
        edges = gap_edges[min(k, neighbour)]
        for a, ao, b, bo, _ in edges:
            mine, other, off = (b, a, ao) if neighbour < k else (a, b, bo)
            sums[mine].append(npos[other] + frac(other, off))
        key = {item: (sum(v) / len(v) if (v := sums.get(item)) else float(here[item])) for item in order[k]}
        order[k].sort(key=lambda item: (key[item], here[item]))

    best = [list(c) for c in order]
    best_crossings = crossings()
    for n in range(SWEEPS):
        if n % 2 == 0:
            for k in range(1, len(order)):
                sweep(k, k - 1)
        else:
            for k in range(len(order) - 2, -1, -1):
                sweep(k, k + 1)
        found = crossings()
        if found < best_crossings:
            best, best_crossings = [list(c) for c in order], found
    order[:] = best


# -- rows: each item as close as it can be to the rows of what it connects to ---------------------------------------
def _place_rows(order: list[list[Item]], gap_edges: list[list[Edge]],
                height_of: dict[Item, int]) -> dict[Item, int]:
    y_of: dict[Item, int] = {}
    for items in order:
        y = 0
        for item in items:
            y_of[item] = y
            y += height_of[item] + ROW_GAP

    def place(k: int, from_left: bool) -> None:
        wanted: dict[Item, list[int]] = defaultdict(list)
        if from_left and k > 0:
            for a, ao, b, bo, _ in gap_edges[k - 1]:
                wanted[b].append(y_of[a] + ao - bo)
        elif not from_left and k + 1 < len(order):
            for a, ao, b, bo, _ in gap_edges[k]:
                wanted[a].append(y_of[b] + bo - ao)
        items = order[k]
        desired = [sum(w) / len(w) if (w := wanted.get(i)) else float(y_of[i]) for i in items]
        for item, y in zip(items, _fit(desired, [height_of[i] for i in items]), strict=True):
            y_of[item] = y

    for n in range(6):
        if n % 2 == 0:
            for k in range(len(order)):
                place(k, True)
        else:
            for k in range(len(order) - 1, -1, -1):
                place(k, False)
    top = min(y_of.values(), default=0)
    return {item: y - top + MARGIN for item, y in y_of.items()}


def _fit(desired: list[float], heights: list[int]) -> list[int]:
    """Rows as near the desired ones as the order and spacing allow (least squares: pool adjacent violators)."""
    offsets, total = [], 0
    for h in heights:
        offsets.append(total)
        total += h + ROW_GAP
    blocks: list[list[float]] = []  # [sum, count]
    for d, o in zip(desired, offsets, strict=True):
        blocks.append([d - o, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    z: list[float] = []
    for s, c in blocks:
        z += [s / c] * int(c)
    out: list[int] = []
    for i, (zi, o) in enumerate(zip(z, offsets, strict=True)):
        y = round(zi + o)
        if i and y < out[-1] + heights[i - 1] + ROW_GAP:
            y = out[-1] + heights[i - 1] + ROW_GAP
        out.append(y)
    return out


def _gap_nets(edges: list[Edge], y_of: dict[Item, int]) -> dict[Net, tuple[int, set[int]]]:
    """Each net crossing a gap: the row it leaves on and the rows it arrives on."""
    nets: dict[Net, tuple[int, set[int]]] = {}
    for left, loff, right, roff, net in edges:
        nets.setdefault(net, (y_of[left] + loff, set()))[1].add(y_of[right] + roff)
    return nets


def _untangle(order: list[list[Item]], gap_edges: list[list[Edge]], y_of: dict[Item, int]) -> None:
    """Shift a column up or down a little where two nets would each leave on the row the other arrives on.

    No choice of lanes keeps such a pair's stubs apart; moving the right-hand column by a row or two does.
    Columns are fixed left to right, so a shift only ever changes the gaps still to come.
    """
    for k, edges in enumerate(gap_edges):
        if not _lane_order(_gap_nets(edges, y_of))[2]:
            continue
        column = order[k + 1]
        for shift in (1, -1, 2, -2, 3, -3):
            for item in column:
                y_of[item] += shift
            if not _lane_order(_gap_nets(edges, y_of))[2]:
                break
            for item in column:
                y_of[item] -= shift
    top = min(y_of.values(), default=MARGIN)
    for item in y_of:
        y_of[item] += MARGIN - top


# -- lanes in a gap --------------------------------------------------------------------------------------------------
def _lane_order(nets: dict[Net, tuple[int, set[int]]]) -> tuple[list[Net], dict[Net, set[Net]], bool]:
    """The nets that change row, in the order lanes are given out; the "left of" constraints; and whether
    those constraints form a cycle (then two stubs on one row cannot both be kept apart)."""
    bending = {net: (left, rights) for net, (left, rights) in nets.items() if rights != {left}}
    must_precede: dict[Net, set[Net]] = defaultdict(set)  # net -> nets that must be to its right
    arriving = {r: net for net, (_, rights) in bending.items() for r in rights}
    for net, (left, _) in bending.items():
        other = arriving.get(left)
        if other is not None and other != net:
            must_precede[net].add(other)

    def key(net: Net) -> tuple[int, int, str, int]:
        left, rights = bending[net]
        down = sum(rights) / len(rights) >= left
        return (0, -left, *net) if down else (1, left, *net)

    pending = {net: {n for n in bending if net in must_precede[n]} for net in bending}
    placed: list[Net] = []
    cyclic = False
    while pending:
        free = [n for n, before in pending.items() if not before]
        if not free:
            free, cyclic = list(pending), True
        net = min(free, key=key)
        placed.append(net)
        del pending[net]
        for before in pending.values():
            before.discard(net)
    return placed, must_precede, cyclic


def _assign_lanes(nets: dict[Net, tuple[int, set[int]]]) -> dict[Net, int]:
    """A lane (0 = leftmost) for each net that changes row in this gap.

    Two nets whose vertical runs overlap (or touch) get different lanes. A net leaving on row r goes left
    of a net arriving on row r, so the two stubs on that row do not meet. Nets going down are ordered
    lowest start first and nets going up highest start first, which avoids crossings where it can.
    """
    placed, must_precede, _ = _lane_order(nets)
    span = {net: (min(nets[net][1] | {nets[net][0]}), max(nets[net][1] | {nets[net][0]})) for net in placed}
    lanes: dict[Net, int] = {}
    for net in placed:
        low, high = span[net]
        lane = 1 + max((lanes[n] for n in lanes if net in must_precede[n]), default=-1)
        while any(lanes[n] == lane and span[n][0] <= high + 1 and low <= span[n][1] + 1 for n in lanes):
            lane += 1
        lanes[net] = lane
    return lanes


# -- moving the selection --------------------------------------------------------------------------------------------
def nearest(layout: GraphLayout, node_id: str, direction: Direction) -> str | None:
    """The node nearest to ``node_id`` in ``direction`` (arrow keys), or None when there is none that way.

    Distance along the direction counts once, distance across it twice, so ``up`` and ``down`` stay in the
    column and ``left``/``right`` stay near the row when they can.
    """
    here = layout.boxes.get(node_id)
    if here is None:
        return None
    cx, cy = here.center
    best: tuple[float, str] | None = None
    for other in layout.boxes.values():
        if other.node_id == node_id:
            continue
        ox, oy = other.center
        dx, dy = ox - cx, oy - cy
        along, across = {"up": (-dy, dx), "down": (dy, dx), "left": (-dx, dy), "right": (dx, dy)}[direction]
        if direction in ("left", "right") and other.column == here.column:
            continue
        if along <= 0:
            continue
        score = along + 2 * abs(across)
        if best is None or score < best[0]:
            best = (score, other.node_id)
    return best[1] if best else None

"""The workflow drawn as boxes and lines: a scrolling Line-API widget over a rasterised layout.

``GraphCanvas`` turns a ``GraphLayout`` into a grid of characters, each with a key saying what it
belongs to (a node's border, title or class; a link and the nodes it joins). ``GraphView`` renders only
the rows and columns in view, styling each key from the widget's component classes, so a graph of
any size costs one screenful per frame. Moving the selection redraws two boxes, not the grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.cells import get_character_cell_size
from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.events import Click
from textual.geometry import Region, Size, Spacing
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tui_diffusion.graph.layout import BOX_WIDTH, Direction, GraphLayout, layout_graph, nearest
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.text import printable

UP, DOWN, LEFT, RIGHT = 1, 2, 4, 8
LINE_CHARS = {
    LEFT | RIGHT: "─", UP | DOWN: "│", DOWN | RIGHT: "╭", DOWN | LEFT: "╮", UP | RIGHT: "╰", UP | LEFT: "╯",
    UP | DOWN | RIGHT: "├", UP | DOWN | LEFT: "┤", LEFT | RIGHT | DOWN: "┬", LEFT | RIGHT | UP: "┴",
    UP | DOWN | LEFT | RIGHT: "┼", LEFT: "─", RIGHT: "─", UP: "│", DOWN: "│",
}
#: box glyphs: corners, horizontal, vertical, input port (left border), output port (right border)
LIGHT = ("╭", "╮", "╰", "╯", "─", "│", "┤", "├")
HEAVY = ("┏", "┓", "┗", "┛", "━", "┃", "┨", "┠")
#: link colours by socket type, ComfyUI's palette
TYPE_COLOURS = {
    "MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9",
    "IMAGE": "#64b5f6", "MASK": "#81c784",
}
OTHER_COLOUR = "#a0a0a0"
RUNNING_LABEL = " ▶ running "

Key = tuple[Any, ...]


def truncate(text: str, width: int) -> list[str]:
    """``text`` as at most ``width`` cells, one string per cell ("" after a wide character), ending in "…" when
    it had to be cut."""
    text = printable("".join(" " if c in "\t\n\r" else c for c in text))  # line breaks as spaces, other controls
    text = "".join(c if c.isprintable() else " " for c in text)  # as escapes (a name must not reach the terminal)
    cells: list[str] = []
    for char in text:
        size = get_character_cell_size(char)
        if size == 0:
            if cells:
                cells[-1 if cells[-1] else -2] += char
            continue
        cells += [char] + [""] * (size - 1)
    if len(cells) <= width:
        return cells
    cut = cells[: width - 1]
    if cut and cut[-1] and get_character_cell_size(cut[-1][0]) == 2:
        cut[-1] = " "  # a wide character whose right half was cut off: blank it
    return cut + ["…"]


class GraphCanvas:
    """A layout rasterised into characters; each cell also has a style key (see ``key``)."""

    BLANK: Key = ("blank",)

    def __init__(self, layout: GraphLayout) -> None:
        self.layout = layout
        self.width, self.height = layout.width, layout.height
        self.chars = [[" "] * self.width for _ in range(self.height)]
        self._keys: list[Key] = [self.BLANK]
        self._key_index: dict[Key, int] = {self.BLANK: 0}
        self.key_ids = [[0] * self.width for _ in range(self.height)]
        self._draw_links()
        for node_id in layout.boxes:
            self.draw_box(node_id)

    def key(self, x: int, y: int) -> Key:
        """What the cell shows: ("blank",), ("link", ((type, frozenset of the nodes joined), ...)) with one
        entry per output whose line passes (two at a crossing), or
        ("box", node id, part) with part one of border, id, title, class, status."""
        return self._keys[self.key_ids[y][x]]

    def keys(self) -> list[Key]:
        return self._keys

    def row(self, y: int) -> tuple[list[str], list[int]]:
        return self.chars[y], self.key_ids[y]

    def text(self) -> str:
        """The whole canvas as plain text (tests and debugging)."""
        return "\n".join("".join(row).rstrip() for row in self.chars)

    def _intern(self, key: Key) -> int:
        index = self._key_index.get(key)
        if index is None:
            index = self._key_index[key] = len(self._keys)
            self._keys.append(key)
        return index

    def _put(self, x: int, y: int, char: str, key: Key) -> None:
        if 0 <= y < self.height and 0 <= x < self.width:
            self.chars[y][x] = char
            self.key_ids[y][x] = self._intern(key)

    def _draw_links(self) -> None:
        masks: dict[tuple[int, int], int] = {}
        # per cell, per output (the links of one output share their cells): its type and the nodes joined
        nets: dict[tuple[int, int], dict[tuple[str, int], tuple[str, set[str]]]] = {}
        for link in self.layout.links:
            cells: list[tuple[int, int, int]] = []
            for (x0, y0), (x1, y1) in zip(link.points, link.points[1:], strict=False):
                if y0 == y1:
                    step = 1 if x1 > x0 else -1
                    ahead, back = (RIGHT, LEFT) if step > 0 else (LEFT, RIGHT)
                    cells += [(x, y0, ahead | back) for x in range(x0 + step, x1, step)]
                    cells += [(x0, y0, ahead), (x1, y1, back)]
                else:
                    step = 1 if y1 > y0 else -1
                    ahead, back = (DOWN, UP) if step > 0 else (UP, DOWN)
                    cells += [(x0, y, ahead | back) for y in range(y0 + step, y1, step)]
                    cells += [(x0, y0, ahead), (x1, y1, back)]
            (sx, sy), (ex, ey) = link.points[0], link.points[-1]
            cells += [(sx, sy, LEFT), (ex, ey, RIGHT)]  # into the ports on the box borders
            for x, y, mask in cells:
                masks[(x, y)] = masks.get((x, y), 0) | mask
                net = nets.setdefault((x, y), {}).setdefault((link.source, link.output_index), (link.type, set()))
                net[1].update((link.source, link.target))
        for (x, y), mask in masks.items():
            entries = tuple((kind, frozenset(joined)) for _, (kind, joined) in sorted(nets[(x, y)].items()))
            self._put(x, y, LINE_CHARS[mask], ("link", entries))

    def draw_box(self, node_id: str, selected: bool = False, running: bool = False) -> None:
        """(Re)draw one node's box: heavy lines when selected, a running label on the bottom border."""
        box = self.layout.boxes[node_id]
        tl, tr, bl, br, hz, vt, port_in, port_out = HEAVY if selected else LIGHT
        x, y, w, h = box.x, box.y, box.width, box.height
        border: Key = ("box", node_id, "border")
        self._put(x, y, tl, border)
        for i in range(1, w - 1):
            self._put(x + i, y, hz, border)
            self._put(x + i, y + h - 1, hz, border)
        self._put(x + w - 1, y, tr, border)
        self._put(x, y + h - 1, bl, border)
        self._put(x + w - 1, y + h - 1, br, border)
        for j in range(1, h - 1):
            self._put(x, y + j, vt, border)
            self._put(x + w - 1, y + j, vt, border)
            for i in range(1, w - 1):
                self._put(x + i, y + j, " ", ("box", node_id, "fill"))
        for name in box.inputs:
            self._put(x, box.input_row(name), port_in, border)
        for index in box.outputs:
            self._put(x + w - 1, box.output_row(index), port_out, border)
        for i, char in enumerate(truncate(f" {node_id} ", w - 4)):
            self._put(x + 2 + i, y, char, ("box", node_id, "id"))
        for row, (text, part) in enumerate(((box.title, "title"), (box.class_type, "class")), start=1):
            for i, char in enumerate(truncate(text, w - 2)):
                self._put(x + 1 + i, y + row, char, ("box", node_id, part))
        if running:
            label = truncate(RUNNING_LABEL, w - 4)
            for i, char in enumerate(label):
                self._put(x + 2 + i, y + h - 1, char, ("box", node_id, "status"))

    def node_at(self, x: int, y: int) -> str | None:
        for box in self.layout.boxes.values():
            if box.contains(x, y):
                return box.node_id
        return None


class GraphView(ScrollView, can_focus=True):
    """The workflow as a graph: arrows move the selection, ``enter`` chooses the selected node."""

    DEFAULT_CSS = """
    GraphView { background: $surface; }
    GraphView > .graph-view--border { color: $foreground 55%; }
    GraphView > .graph-view--id { color: $text-secondary; }
    GraphView > .graph-view--title { color: $foreground; text-style: bold; }
    GraphView > .graph-view--class { color: $foreground 60%; }
    GraphView > .graph-view--selected { color: $accent; text-style: bold; }
    GraphView > .graph-view--running { color: $success; text-style: bold; }  /* green, as ComfyUI outlines it */
    """
    COMPONENT_CLASSES = {
        "graph-view--border", "graph-view--id", "graph-view--title", "graph-view--class", "graph-view--selected",
        "graph-view--running",
    }
    BINDINGS = [
        Binding("up", "move('up')", "Up", show=False),
        Binding("down", "move('down')", "Down", show=False),
        Binding("left", "move('left')", "Left", show=False),
        Binding("right", "move('right')", "Right", show=False),
        Binding("shift+up", "pan(0, -1)", "Pan", show=False),
        Binding("shift+down", "pan(0, 1)", "Pan", show=False),
        Binding("shift+left", "pan(-1, 0)", "Pan", show=False),
        Binding("shift+right", "pan(1, 0)", "Pan", show=False),
        Binding("enter", "choose", "Open node", tooltip="Open the selected node's form"),
        Binding("r", "to_running", "Running node", tooltip="Select the node that is running"),
    ]

    selected: reactive[str | None] = reactive(None, init=False)
    running: reactive[str | None] = reactive(None, init=False)

    class SelectionChanged(Message):
        def __init__(self, view: GraphView, node_id: str | None) -> None:
            super().__init__()
            self.view = view
            self.node_id = node_id

        @property
        def control(self) -> GraphView:
            return self.view

    class NodeChosen(Message):
        """``enter`` (or a click on the selected node): open this node."""

        def __init__(self, view: GraphView, node_id: str) -> None:
            super().__init__()
            self.view = view
            self.node_id = node_id

        @property
        def control(self) -> GraphView:
            return self.view

    def __init__(self, workflow: Workflow, selected: str | None = None, running: str | None = None, *,
                 box_width: int = BOX_WIDTH, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.box_width = box_width
        self.canvas = GraphCanvas(layout_graph(workflow, box_width))
        self.virtual_size = Size(self.canvas.width, self.canvas.height)
        boxes = self.canvas.layout.boxes
        self.set_reactive(GraphView.selected, selected if selected in boxes else next(iter(boxes), None))
        self.set_reactive(GraphView.running, running if running in boxes else None)
        self._redraw(self.selected)
        self._redraw(self.running)
        self._styles: dict[int, Style] = {}  # per cell key, for the current selection and running node
        self._components: dict[str, Style] = {}  # the CSS's styles, until the CSS changes

    # -- state --------------------------------------------------------------------------------------------------
    def _redraw(self, node_id: str | None) -> None:
        if node_id is not None and node_id in self.canvas.layout.boxes:
            self.canvas.draw_box(node_id, selected=node_id == self.selected, running=node_id == self.running)

    def validate_selected(self, node_id: str | None) -> str | None:
        return node_id if node_id in self.canvas.layout.boxes else self.selected

    def validate_running(self, node_id: str | None) -> str | None:
        return node_id if node_id in self.canvas.layout.boxes else None

    def watch_selected(self, old: str | None, new: str | None) -> None:
        self._redraw(old)
        self._redraw(new)
        self._styles.clear()
        self.refresh()
        self.scroll_to_node(new)
        self.post_message(self.SelectionChanged(self, new))

    def watch_running(self, old: str | None, new: str | None) -> None:
        self._redraw(old)
        self._redraw(new)
        self._styles.clear()
        self.refresh()

    def on_mount(self) -> None:
        self.call_after_refresh(self.scroll_to_node, self.selected, center=True)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()
        self._components.clear()

    def scroll_to_node(self, node_id: str | None, center: bool = False) -> None:
        """Pan just enough that the node's box (and a margin for its links) is in view; or put it in the middle
        (on opening, so what feeds it and what it feeds are both in view)."""
        box = self.canvas.layout.boxes.get(node_id) if node_id else None
        if box is not None:
            self.scroll_to_region(Region(box.x, box.y, box.width, box.height), spacing=Spacing(1, 3, 1, 3),
                                  animate=False, center=center, immediate=True)

    # -- keys and mouse -----------------------------------------------------------------------------------------
    def action_move(self, direction: Direction) -> None:
        if self.selected is None:
            return
        target = nearest(self.canvas.layout, self.selected, direction)
        if target is not None:
            self.selected = target

    def action_pan(self, dx: int, dy: int) -> None:
        self.scroll_to(self.scroll_x + dx * max(4, self.size.width // 4),
                       self.scroll_y + dy * max(2, self.size.height // 4), animate=False)

    def action_choose(self) -> None:
        if self.selected is not None:
            self.post_message(self.NodeChosen(self, self.selected))

    def action_to_running(self) -> None:
        if self.running is not None:
            self.selected = self.running
        else:
            self.notify("no node is running")

    def on_click(self, event: Click) -> None:
        node_id = self.canvas.node_at(event.x + int(self.scroll_x), event.y + int(self.scroll_y))
        if node_id is None:
            return
        if node_id == self.selected and event.chain >= 2:
            self.post_message(self.NodeChosen(self, node_id))
        self.selected = node_id

    # -- rendering ---------------------------------------------------------------------------------------------------
    def _style(self, key_id: int) -> Style:
        style = self._styles.get(key_id)
        if style is None:
            style = self._styles[key_id] = self._make_style(self.canvas.keys()[key_id])
        return style

    def _component(self, name: str) -> Style:
        style = self._components.get(name)
        if style is None:
            base = self._components.get("") or self._components.setdefault("", self.rich_style)
            style = self._components[name] = base + self.get_component_rich_style(f"graph-view--{name}") \
                if name else base
        return style

    def _make_style(self, key: Key) -> Style:
        if key[0] == "link":
            # at a crossing, the line of the selected node's link sets the colour
            touched = [kind for kind, joined in key[1] if self.selected in joined]
            colour = TYPE_COLOURS.get(touched[0] if touched else key[1][0][0], OTHER_COLOUR)
            return self._component("") + Style(color=colour, bold=bool(touched),
                                               dim=not touched and self.selected is not None)
        if key[0] == "box":
            _, node_id, part = key
            style = self._component({"fill": "border", "status": "running"}.get(part, part))
            if part in ("border", "id", "status"):
                if node_id == self.running:
                    style += self._component("running")
                if node_id == self.selected:
                    style += self._component("selected")
            return style
        return self._component("")

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        row = y + scroll_y
        width = self.scrollable_content_region.width
        if not 0 <= row < self.canvas.height:
            return Strip.blank(width, self._component(""))
        chars, key_ids = self.canvas.row(row)
        return Strip(list(self._segments(chars, key_ids, scroll_x, scroll_x + width)), width)

    def _segments(self, chars: list[str], key_ids: list[int], start: int, end: int) -> Iterator[Segment]:
        stop = min(end, len(chars))
        x = start
        while x < stop:
            key_id = key_ids[x]
            text: list[str] = []
            while x < stop and key_ids[x] == key_id:
                char = chars[x]
                if char == "" and x == start:
                    char = " "  # the right half of a wide character cut at the left edge
                elif char and x + 1 < len(chars) and chars[x + 1] == "" and x + 1 >= stop:
                    char = " "  # a wide character cut at the right edge
                text.append(char)
                x += 1
            yield Segment("".join(text), self._style(key_id))
        if end > stop:
            yield Segment(" " * (end - max(stop, start)), self._component(""))

"""Subgraphs and group nodes of ComfyUI's UI format, expanded into one flat UI-format graph.

ComfyUI's frontend keeps reusable parts of a workflow in two ways, and flattens both before it sends a prompt:

- **Subgraphs** (``definitions.subgraphs``, each with its own nodes and links, nestable): an instance is a node
  whose ``type`` is the definition's id. Inside a definition, links leave the subgraph's input node (id -10,
  the slot being the subgraph input's index) and enter its output node (id -20). An instance's input is matched
  to the definition's input of the same name; an unconnected input that feeds a widget inside is a *promoted
  widget*, whose value the instance keeps in ``widgets_values`` (one per promoted input, in input order; older
  files add the seed's "control after generate" entry after it). Without a value there, the inner widget's own
  value is used, for every inner node that input feeds.
- **Group nodes** (the older ``extra.groupNodes``, instances typed ``workflow>NAME`` or ``workflow/NAME``): the
  instance's inputs are the inner nodes' inputs not linked inside the group (plain inputs node by node, then the
  widgets converted to inputs; ``config`` may hide some), its outputs the inner outputs not used only inside, and
  its ``widgets_values`` the inner widgets node by node, then the converted ones, each seed followed by its
  "control after generate" entry. As in ComfyUI's frontend, the instance's values (controls included) replace
  those saved inside; frontend-only nodes count as ComfyUI counts them (a note has no widget, a linked
  PrimitiveNode its own, an unlinked one nothing, a Reroute none unless it feeds widgets: then it is one widget
  whose value they all take), and a node this program lacks takes as many values as it saved. When the counts
  still disagree, the inner nodes keep their saved values. A widget converted to an input on the instance and fed
  by a PrimitiveNode takes that node's value (matched by the name ComfyUI's frontend gives the widget).

Expanded nodes get ComfyUI's execution ids: the path of instance ids down to the inner node, joined with ":"
(``"56:52"`` is node 52 inside instance 56), so the ids in messages are the ones ComfyUI shows. A muted instance
runs nothing; a bypassed one passes its first input of the matching type through, as any bypassed node does.

The result is a plain UI-format graph (Reroutes, PrimitiveNodes, muted and bypassed inner nodes left as they are)
that :func:`tui_diffusion.graph.ui_format.ui_to_api` converts like any other. Every walk here is a loop with a
visited set or a bound (nesting depth, expanded node count): a crafted file cannot exhaust the stack or memory,
and definitions that contain each other are refused by name.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from tui_diffusion.graph.specs import get_spec

#: the ids ComfyUI's frontend gives a subgraph's input and output nodes inside its definition
SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID = -10, -20
MUTED, BYPASSED = 2, 4
#: deeper nesting than any real workflow (ComfyUI's templates nest two levels)
MAX_NESTING = 32
#: the most nodes an expansion may produce: a definition used twice in one used twice... grows exponentially
MAX_EXPANDED_NODES = 20_000
#: the property (kept in the API format's ``_meta``) naming the subgraph instances a node came from
META_PROPERTY = "tui-diffusion meta"
GROUP_PREFIXES = ("workflow>", "workflow/")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SEED_NAMES = ("seed", "noise_seed")
SEED_MODES = ("fixed", "increment", "decrement", "randomize")
#: node types of ComfyUI's frontend only: in a group node, ComfyUI gives them no widget (a linked PrimitiveNode
#: shows its own) and a note or an unlinked PrimitiveNode no input or output either
_NO_WIDGETS = ("Reroute", "Note", "MarkdownNote")


class SubgraphError(ValueError):
    """A subgraph or group node that cannot be expanded; the message names the file and the node."""


@dataclass
class _Graph:
    """One level of a workflow: the root graph, a subgraph definition, or a group node's contents."""

    name: str
    nodes: dict[Any, dict[str, Any]]
    #: link id -> (origin id, origin slot, target id, target slot, type)
    links: dict[Any, tuple[Any, int, Any, int, str]]
    #: the definition's inputs (name, type) by index; empty for the root
    inputs: list[tuple[str, str]] = field(default_factory=list)
    #: group nodes only: the instance input index -> (inner node, its input slot), in the instance's order
    group_inputs: list[tuple[Any, int]] = field(default_factory=list)
    #: group nodes only: (inner node, widget name, has a control entry) in the instance's widget order, the name
    #: a position in the node's saved ``widgets_values`` for nodes without a spec; None when the order cannot be
    #: known (a node this program lacks with widgets converted to inputs)
    group_widgets: list[tuple[Any, str | int, bool]] | None = None
    #: group nodes only: the instance's widget names as ComfyUI's frontend shows them -> (inner node, widget)
    group_widget_names: dict[str, tuple[Any, str | int]] = field(default_factory=dict)
    #: group nodes only: a Reroute that is a widget of the instance -> the (inner node, widget name) it feeds
    group_reroutes: dict[Any, list[tuple[Any, str]]] = field(default_factory=dict)
    is_group: bool = False
    #: subgraph input index -> the inner (node, widget) it promotes (filled on first use)
    promoted: dict[int, tuple[Any, str]] | None = None

    def output_link(self, slot: int) -> Any:
        """The link entering the output node's ``slot`` (what the instance's output ``slot`` carries), or None."""
        return next((lid for lid, link in self.links.items()
                     if link[2] == SUBGRAPH_OUTPUT_ID and link[3] == slot), None)


def _link_table(links: Any) -> dict[Any, tuple[Any, int, Any, int, str]]:
    """Links in either encoding ComfyUI writes (lists at the root, objects in definitions), by id."""
    out: dict[Any, tuple[Any, int, Any, int, str]] = {}
    for link in links or []:
        if isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else "*")
        elif isinstance(link, dict) and "id" in link:
            out[link["id"]] = (link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                               link.get("target_slot"), link.get("type", "*"))
    return out


def _group_name(kind: Any) -> str | None:
    if isinstance(kind, str):
        for prefix in GROUP_PREFIXES:
            if kind.startswith(prefix):
                return kind[len(prefix):]
    return None


def _definitions(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every subgraph definition by id, including those nested in other definitions' own ``definitions``."""
    found: dict[str, dict[str, Any]] = {}
    stack = [data]
    while stack:
        holder = stack.pop()
        defs = holder.get("definitions") if isinstance(holder, dict) else None
        for sub in (defs.get("subgraphs") if isinstance(defs, dict) else None) or []:
            if isinstance(sub, dict) and isinstance(sub.get("id"), str) and sub["id"] not in found:
                found[sub["id"]] = sub
                stack.append(sub)
    return found


def needs_expansion(data: dict[str, Any]) -> bool:
    """Whether a UI-format workflow uses subgraphs or group nodes (or names an instance of a missing one)."""
    return bool(_definitions(data)) or any(
        isinstance(n, dict) and isinstance(n.get("type"), str) and (_group_name(n["type"]) or _UUID.match(n["type"]))
        for n in data.get("nodes") or [])


def _check_cycles(defs: dict[str, dict[str, Any]], source: str) -> None:
    """Refuse definitions that contain themselves, directly or through others, naming the loop."""
    uses = {d: [n.get("type") for n in sub.get("nodes") or [] if isinstance(n, dict) and n.get("type") in defs]
            for d, sub in defs.items()}
    state: dict[str, int] = {}
    for root in defs:
        if root in state:
            continue
        path = [root]
        state[root] = 1
        stack = [iter(uses[root])]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                state[path.pop()] = 2
                continue
            if state.get(child) == 1:
                loop = path[path.index(child):] + [child]
                names = " -> ".join(repr(defs[d].get("name") or d) for d in loop)
                raise SubgraphError(f"{source}: subgraph {names}: a subgraph cannot contain itself")
            if child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(uses[child]))


def _definition_graph(sub: dict[str, Any]) -> _Graph:
    nodes = {n["id"]: n for n in sub.get("nodes") or [] if isinstance(n, dict) and "id" in n}
    inputs = [(str(i.get("name")), str(i.get("type", "*"))) for i in sub.get("inputs") or [] if isinstance(i, dict)]
    return _Graph(str(sub.get("name") or sub.get("id")), nodes, _link_table(sub.get("links")), inputs)


def _widget_names(node: dict[str, Any]) -> list[tuple[str, bool]] | None:
    """A node's widgets in ComfyUI's order, each with whether a "control after generate" entry follows it; None
    for a node type this program lacks."""
    spec = get_spec(node.get("type"))
    if spec is None:
        return None
    return [(i.name, i.control_after_generate or i.name in _SEED_NAMES) for i in spec.inputs if i.is_widget]


def _converted_order(count: int) -> list[int]:
    """Input slots in the order ComfyUI's frontend takes a node's converted widgets in a group: by slot, compared
    as text (slot 10 before slot 2), which is the order they were converted in."""
    return sorted(range(count), key=str)


def _reroute_type(nodes: dict[Any, dict[str, Any]], raw_links: list[Any], index: Any) -> str:
    """A Reroute's type inside a group, as ComfyUI's frontend finds it (its input is named after it): the first
    input it feeds, else the output feeding it, else the type stored on a link into it."""
    links = [link for link in raw_links if isinstance(link, list) and len(link) >= 4]
    for link in links:
        if link[0] == index and link[2] in nodes and isinstance(link[3], int) \
                and 0 <= link[3] < len(nodes[link[2]]["inputs"]):
            return str(nodes[link[2]]["inputs"][link[3]].get("type"))
    for link in links:
        outputs = (nodes.get(link[0]) or {}).get("outputs") or []
        if link[2] == index and isinstance(link[1], int) and 0 <= link[1] < len(outputs):
            return str(outputs[link[1]].get("type"))
    return str(next((link[5] for link in links if len(link) > 5 and link[2] == index), "*"))


def _has_control(kind: Any, name: str) -> bool:
    """Whether widget ``name`` of a node type has a "control after generate" entry after it."""
    spec = get_spec(kind)
    ispec = spec.input(name) if spec else None
    return bool(ispec and ispec.control_after_generate)


def _with_values(node: dict[str, Any], values: dict[str | int, tuple[Any, Any]]) -> Any:
    """An inner node's ``widgets_values`` with a group instance's values (and seed controls) in place of those
    saved with the definition, laid out as the UI-format conversion reads them."""
    saved = node.get("widgets_values")
    spec = get_spec(node.get("type"))
    if spec is None or node.get("type") == "PrimitiveNode":  # by position, as it saved them
        out = list(saved) if isinstance(saved, list) else []
        for key, (value, _) in values.items():
            if isinstance(key, int) and 0 <= key < len(out):
                out[key] = value
        return out
    if isinstance(saved, dict):  # newer frontends save some nodes' values by name
        return {**saved, **{k: v for k, (v, _) in values.items()}}
    from tui_diffusion.graph.ui_format import ui_to_api

    single = {"id": 0, "type": node.get("type"), "inputs": [], "widgets_values": saved}
    parsed = ui_to_api({"nodes": [single], "links": []}).get("0", {})
    own, controls = parsed.get("inputs", {}), parsed.get("_meta", {}).get("control_after_generate", {})
    out = []
    for ispec in spec.inputs:
        if not ispec.is_widget:
            continue
        value, control = values.get(ispec.name, (own.get(ispec.name, ispec.default), None))
        if ispec.name not in values and ispec.name not in own and ispec.default is None:
            break  # neither the instance nor the node has it: leave it, and what follows, missing
        out.append(value)
        if ispec.control_after_generate:
            out.append(control if control is not None else controls.get(ispec.name, "fixed"))
    return out


def _group_graph(name: str, group: Any, source: str) -> _Graph:
    """A group node's contents as a graph shaped like a subgraph definition: synthetic links from the input
    node (-10) for the instance's inputs and into the output node (-20) for its outputs."""
    if not isinstance(group, dict) or not isinstance(group.get("nodes"), list):
        raise SubgraphError(f"{source}: group node {name!r}: its definition in extra.groupNodes has no nodes")
    nodes: dict[Any, dict[str, Any]] = {}
    for index, raw in enumerate(group["nodes"]):
        node = copy.deepcopy(raw) if isinstance(raw, dict) else {}
        node["id"] = index
        node["inputs"] = [dict(i, link=None) for i in node.get("inputs") or [] if isinstance(i, dict)]
        nodes[index] = node
    links: dict[Any, tuple[Any, int, Any, int, str]] = {}
    linked_to: set[tuple[int, int]] = set()
    linked_from: set[tuple[int, int]] = set()
    for link in group.get("links") or []:
        if not (isinstance(link, list) and len(link) >= 4):
            continue
        origin, oslot, target, tslot = link[:4]
        if not all(isinstance(v, int) for v in (origin, oslot, target, tslot)) or origin not in nodes \
                or target not in nodes:
            continue  # links from outside the group (origin null) are the instance's inputs
        lid = f"g{len(links)}"
        links[lid] = (origin, oslot, target, tslot, link[5] if len(link) > 5 else "*")
        inputs = nodes[target]["inputs"]
        if isinstance(tslot, int) and 0 <= tslot < len(inputs):
            inputs[tslot]["link"] = lid
        linked_to.add((target, tslot))
        linked_from.add((origin, oslot))
    # some files hold a whole node, not its index, here: ComfyUI's frontend never matches those, nor does this
    external = {(e[0], e[1]) for e in group.get("external") or []
                if isinstance(e, list) and len(e) >= 2 and isinstance(e[0], int) and isinstance(e[1], int)}
    config = group.get("config") if isinstance(group.get("config"), dict) else {}
    unused = {i for i, n in nodes.items()  # ComfyUI leaves out notes and PrimitiveNodes that feed nothing
              if n.get("type") in ("Note", "MarkdownNote") or (n.get("type") == "PrimitiveNode"
                                                                and not any(o == i for o, _ in linked_from))}
    # a Reroute whose first target is a widget is a widget of the instance (not an input): its value goes to every
    # widget it feeds, with a seed's control entry after it when it feeds one
    fed: dict[Any, list[tuple[Any, str]]] = {}  # such a Reroute -> the (node, widget) it feeds
    widget_reroutes: dict[Any, bool] = {}  # such a Reroute -> whether a seed's control entry follows its value
    for index, node in nodes.items():
        targets = [(t, nodes[t]["inputs"][slot]) for o, _, t, slot, _ in links.values()
                   if o == index and 0 <= slot < len(nodes[t]["inputs"])]
        if node.get("type") == "Reroute" and targets and "widget" in targets[0][1]:
            fed[index] = [(t, str(inp.get("name"))) for t, inp in targets if "widget" in inp]
            widget_reroutes[index] = any(_has_control(nodes[t].get("type"), name) for t, name in fed[index])

    def visible(kind: str, index: int, key: Any, default: bool) -> bool:
        entry = (config.get(str(index)) or {}).get(kind) or {}
        value = (entry.get(str(key)) or {}).get("visible") if isinstance(entry, dict) else None
        return default if value is None else bool(value)

    def input_key(index: int, inp: dict[str, Any]) -> Any:
        """The name ``config`` uses for an input: a Reroute's is its type, as ComfyUI's frontend names it."""
        return _reroute_type(nodes, group.get("links") or [], index) if nodes[index].get("type") == "Reroute" \
            else inp.get("name")

    graph = _Graph(name, nodes, links, is_group=True, group_reroutes=fed)
    for converted in (False, True):  # plain inputs node by node, then the widgets converted to inputs
        for index, node in nodes.items():
            for slot in _converted_order(len(node["inputs"])) if converted else range(len(node["inputs"])):
                inp = node["inputs"][slot]
                if ("widget" in inp) != converted or (index, slot) in linked_to or index in widget_reroutes:
                    continue
                if not converted and not visible("input", index, input_key(index, inp), True):
                    continue
                k = len(graph.group_inputs)
                lid = f"gi{k}"
                links[lid] = (SUBGRAPH_INPUT_ID, k, index, slot, str(inp.get("type", "*")))
                inp["link"] = lid
                graph.group_inputs.append((index, slot))
                graph.inputs.append((str(inp.get("name")), str(inp.get("type", "*"))))
    outputs = 0
    for index, node in nodes.items():
        spec = get_spec(node.get("type"))
        count = 0 if index in unused else len(spec.outputs) if spec else len(node.get("outputs") or [])
        saved = [o for o in node.get("outputs") or [] if isinstance(o, dict)]
        for slot in range(count):
            internal = (index, slot) in linked_from and (index, slot) not in external
            if visible("output", index, slot, not internal):  # typed, so that a bypassed instance passes through
                kind = spec.outputs[slot].type if spec else (saved[slot].get("type") if slot < len(saved) else "*")
                links[f"go{outputs}"] = (index, slot, SUBGRAPH_OUTPUT_ID, outputs, str(kind))
                outputs += 1
    widgets: list[tuple[Any, str | int, bool]] = []
    converted_widgets: list[tuple[Any, str | int, bool]] = []
    for index, node in nodes.items():
        kind = node.get("type")
        if index in widget_reroutes:
            widgets.append((index, "value", widget_reroutes[index]))
            continue
        if kind in _NO_WIDGETS or index in unused:
            continue
        as_inputs = {i.get("name"): slot for slot, i in enumerate(node["inputs"]) if "widget" in i}
        if kind == "PrimitiveNode" or get_spec(kind) is None:
            # its widgets as it saved them (a PrimitiveNode's value, then its control and filter entries)
            saved = node.get("widgets_values")
            if as_inputs or not isinstance(saved, (list, type(None))):
                graph.group_widgets = None
                break
            widgets.extend((index, position, False) for position in range(len(saved or [])))
            continue
        names = dict(_widget_names(node) or [])
        widgets.extend((index, wname, control) for wname, control in names.items() if wname not in as_inputs)
        by_slot = {slot: wname for wname, slot in as_inputs.items() if wname in names}
        converted_widgets.extend((index, by_slot[slot], names[by_slot[slot]]) for slot in _converted_order(len(
            node["inputs"])) if slot in by_slot and (index, slot) not in linked_to)
    else:
        graph.group_widgets = widgets + converted_widgets
    if graph.group_widgets is not None:
        graph.group_widget_names = _instance_widget_names(nodes, group.get("links") or [], config, linked_to, unused,
                                                          widget_reroutes)
    return graph


def _instance_widget_names(nodes: dict[Any, dict[str, Any]], raw_links: list[Any], config: dict[str, Any],
                           linked_to: set[tuple[int, int]], unused: set[Any],
                           widget_reroutes: dict[Any, bool]) -> dict[str, tuple[Any, str | int]]:
    """The names ComfyUI's frontend gives a group node's widgets (what an instance's widget converted to an input
    names): the inner name, or the one ``config`` or a label gives it; on a clash, prefixed with the node's title
    or type, then numbered. Inputs take names from the same pool, in the frontend's order: node by node its
    widgets then its open inputs, then every node's converted widgets."""
    seen: dict[str, int] = {}
    names: dict[str, tuple[Any, str | int]] = {}

    def name_of(index: Any, node: dict[str, Any], input_name: str) -> str:
        custom = ((config.get(str(index)) or {}).get("input") or {}).get(input_name) or {}
        label = next((i.get("label") for i in node["inputs"] if i.get("name") == input_name), None)
        name = custom.get("name") if isinstance(custom, dict) and custom.get("name") is not None else \
            label if label is not None else input_name
        key = name
        if (node.get("type") == "PrimitiveNode" and node.get("title")) or name in seen:
            prefix = f"{node.get('title') or node.get('type')} "
            key = name = f"{prefix}{input_name}"
            if name in seen:
                name = f"{prefix}{seen[name]} {input_name}"
        seen[key] = seen.get(key, 1) + 1
        return str(name)

    deferred: list[tuple[Any, dict[str, Any], int, str]] = []
    for index, node in nodes.items():
        kind = node.get("type")
        if index in unused or kind in ("Note", "MarkdownNote"):
            continue
        if index in widget_reroutes:
            names[name_of(index, node, _reroute_type(nodes, raw_links, index))] = (index, "value")
            continue
        if kind == "PrimitiveNode":
            names[name_of(index, node, "value")] = (index, 0)
            continue
        spec = get_spec(kind)
        converted = {i.get("name"): slot for slot, i in enumerate(node["inputs"]) if "widget" in i}
        if spec is not None:
            for ispec in spec.inputs:
                if ispec.is_widget and ispec.name not in converted:
                    names[name_of(index, node, ispec.name)] = (index, ispec.name)
        for slot, inp in enumerate(node["inputs"]):  # open inputs take names from the same pool
            if "widget" not in inp and (index, slot) not in linked_to:
                name_of(index, node, _reroute_type(nodes, raw_links, index) if kind == "Reroute"
                        else str(inp.get("name")))
        deferred.extend((index, node, slot, str(node["inputs"][slot].get("name")))
                        for slot in _converted_order(len(node["inputs"]))
                        if "widget" in node["inputs"][slot] and (index, slot) not in linked_to)
    for index, node, _, input_name in deferred:
        names[name_of(index, node, input_name)] = (index, input_name)
    return names


class _Expander:
    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.source = source
        self.defs = _definitions(data)
        _check_cycles(self.defs, source)
        self.def_graphs: dict[str, _Graph] = {}
        groups = (data.get("extra") or {}).get("groupNodes") if isinstance(data.get("extra"), dict) else None
        self.groups: dict[str, Any] = groups if isinstance(groups, dict) else {}
        self.group_graphs: dict[str, _Graph] = {}
        root_nodes = {n["id"]: n for n in data.get("nodes") or [] if isinstance(n, dict) and "id" in n}
        self.root = _Graph("<root>", root_nodes, _link_table(data.get("links")))
        #: instance path -> (the graph inside it, the instance node)
        self.contexts: dict[tuple[Any, ...], tuple[_Graph, dict[str, Any]]] = {(): (self.root, {})}
        #: every instance met, expanded or not (a muted one is looked into for its promoted widgets)
        self.known: dict[tuple[Any, ...], tuple[_Graph, dict[str, Any]]] = self.contexts.copy()
        self.group_value_cache: dict[tuple[Any, ...], dict[Any, dict[str, Any]]] = {}
        self.flat_nodes: list[dict[str, Any]] = []
        self.flat_links: list[list[Any]] = []
        self.values = 0

    # -- structure -------------------------------------------------------------------------
    def inner_graph(self, node: dict[str, Any], path: tuple[Any, ...]) -> _Graph | None:
        """The graph inside ``node`` if it is a subgraph or group instance, else None."""
        kind = node.get("type")
        if isinstance(kind, str) and kind in self.defs:
            if kind not in self.def_graphs:
                self.def_graphs[kind] = _definition_graph(self.defs[kind])
            return self.def_graphs[kind]
        group = _group_name(kind)
        if group is not None:
            if group not in self.groups:
                raise SubgraphError(f"{self.source}: node {self.flat_id(path, node['id'])} is the group node "
                                    f"{group!r}, whose definition (extra.groupNodes) the file lacks")
            if group not in self.group_graphs:
                self.group_graphs[group] = _group_graph(group, self.groups[group], self.source)
            return self.group_graphs[group]
        if isinstance(kind, str) and _UUID.match(kind):
            raise SubgraphError(f"{self.source}: node {self.flat_id(path, node['id'])} is an instance of subgraph "
                                f"{kind}, whose definition the file lacks")
        return None

    @staticmethod
    def flat_id(path: tuple[Any, ...], node_id: Any) -> Any:
        """ComfyUI's execution id: the instance ids down to the node, joined with ":" (root nodes keep theirs)."""
        return node_id if not path else ":".join(str(p) for p in (*path, node_id))

    def instance_input(self, path: tuple[Any, ...], index: int) -> dict[str, Any] | None:
        """The serialised input of the instance at ``path`` that carries its definition's input ``index``."""
        graph, instance = self.known[path]
        inputs = [i for i in instance.get("inputs") or [] if isinstance(i, dict)]
        if graph.is_group:
            return inputs[index] if 0 <= index < len(inputs) else None
        if not 0 <= index < len(graph.inputs):
            return None
        name, kind = graph.inputs[index]
        if index < len(inputs) and inputs[index].get("name") == name:
            return inputs[index]
        named = [i for i in inputs if i.get("name") == name]
        return next((i for i in named if i.get("type") == kind), named[0] if named else None)

    def promoted(self, graph: _Graph, index: int) -> tuple[Any, str] | None:
        """The inner (node, input name) whose widget a subgraph input promotes: its first link into an input
        that is a widget, or None when it feeds no widget."""
        if graph.promoted is None:
            graph.promoted = {}
            for link in graph.links.values():
                if link[0] != SUBGRAPH_INPUT_ID or link[1] in graph.promoted:
                    continue
                inputs = (graph.nodes.get(link[2]) or {}).get("inputs") or []
                if isinstance(link[3], int) and 0 <= link[3] < len(inputs) and isinstance(inputs[link[3]], dict) \
                        and "widget" in inputs[link[3]]:
                    graph.promoted[link[1]] = (link[2], str(inputs[link[3]].get("name")))
        return graph.promoted.get(index)

    def promoted_value(self, path: tuple[Any, ...], index: int) -> tuple[str, Any] | None:
        """An unconnected subgraph input's widget value: the instance's saved value, else the inner widget's
        own (following nested instances down); None leaves each inner node its own value."""
        for _ in range(MAX_NESTING + 1):
            graph, instance = self.known[path]
            target = self.promoted(graph, index)
            if target is None:
                return None
            promoted = [k for k in range(len(graph.inputs)) if self.promoted(graph, k)]
            values = instance.get("widgets_values")
            if isinstance(values, list) and index in promoted:
                position = 0
                extra = len(values) > len(promoted)  # older files: a control entry after each seed
                for k in promoted:
                    if k == index:
                        break
                    position += 1
                    source = self.promoted(graph, k)
                    if extra and source and source[1] in _SEED_NAMES:
                        position += 1
                if position < len(values) and values[position] is not None:
                    return ("value", values[position])
            node_id, name = target
            node = graph.nodes[node_id]
            child = (*path, node_id)
            inner = self.inner_graph(node, path)
            if inner is not None and not graph.is_group:  # a nested instance: its own promoted input
                self.known.setdefault(child, (inner, node))
                names = [n for n, _ in inner.inputs]
                if name not in names:
                    return None
                path, index = child, names.index(name)
                continue
            return self.own_widget_value(node, name)
        return None

    @staticmethod
    def own_widget_value(node: dict[str, Any], name: str) -> tuple[str, Any] | None:
        """A plain node's own value for widget ``name``, read as the UI-format conversion reads it."""
        from tui_diffusion.graph.ui_format import ui_to_api

        single = {"id": 0, "type": node.get("type"), "inputs": [], "widgets_values": node.get("widgets_values")}
        inputs = ui_to_api({"nodes": [single], "links": []}).get("0", {}).get("inputs", {})
        return ("value", inputs[name]) if name in inputs else None

    # -- expansion ---------------------------------------------------------------------------
    def expand(self) -> dict[str, Any]:
        pending: list[tuple[Any, ...]] = [()]
        placed: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        while pending:
            path = pending.pop()
            graph, _ = self.contexts[path]
            for node in graph.nodes.values():
                child = (*path, node.get("id"))
                inner = self.inner_graph(node, path)
                if inner is None:
                    placed.append((path, node))
                elif node.get("mode", 0) not in (MUTED, BYPASSED):
                    if len(child) > MAX_NESTING:
                        raise SubgraphError(f"{self.source}: subgraphs nested more than {MAX_NESTING} levels deep "
                                            f"(at node {self.flat_id(path, node.get('id'))})")
                    self.contexts[child] = self.known[child] = (inner, node)
                    pending.append(child)
                if len(placed) + len(self.contexts) > MAX_EXPANDED_NODES:
                    raise SubgraphError(f"{self.source}: its subgraphs expand to more than {MAX_EXPANDED_NODES} "
                                        "nodes: not a workflow this program runs")
        for path, node in placed:
            self.place(path, node)
        return {"nodes": self.flat_nodes, "links": self.flat_links}

    def titles(self, path: tuple[Any, ...]) -> str:
        """The instances a node sits in, outermost first, by title (as ComfyUI's breadcrumb shows them)."""
        names = []
        for depth in range(1, len(path) + 1):
            graph, instance = self.known[path[:depth]]
            names.append(str(instance.get("title") or graph.name))
        return " > ".join(names)

    def place(self, path: tuple[Any, ...], node: dict[str, Any]) -> None:
        flat = dict(node, id=self.flat_id(path, node.get("id")))
        flat["inputs"] = [dict(i) for i in node.get("inputs") or [] if isinstance(i, dict)]
        if path:
            props = dict(node.get("properties") or {}) if isinstance(node.get("properties"), dict) else {}
            meta = dict(props.get(META_PROPERTY) or {}) if isinstance(props.get(META_PROPERTY), dict) else {}
            meta["subgraph"] = self.titles(path)
            props[META_PROPERTY] = meta
            flat["properties"] = props
        for slot, inp in enumerate(flat["inputs"]):
            if inp.get("link") is None:
                continue
            found = self.resolve(path, inp["link"])
            inp["link"] = None if found is None else self.connect(found, flat["id"], slot, inp.get("type", "*"))
        graph, _ = self.contexts[path]
        if graph.is_group and (values := self.group_values(path).get(node.get("id"))):
            if node.get("type") == "Reroute" and "value" in values:  # a widget of the instance, fed onwards
                flat.update(type="PrimitiveNode", inputs=[], widgets_values=[values["value"][0]])
            else:
                flat["widgets_values"] = _with_values(node, values)
        self.flat_nodes.append(flat)

    def group_values(self, path: tuple[Any, ...]) -> dict[Any, dict[str | int, tuple[Any, Any]]]:
        """A group instance's widget values by inner node and widget (name, or position for a node without a
        spec), each with the control entry that follows it (None without one); empty when they cannot be matched
        (then the inner nodes keep the values saved with the group)."""
        if path in self.group_value_cache:
            return self.group_value_cache[path]
        graph, instance = self.contexts[path]
        values = instance.get("widgets_values")
        out: dict[Any, dict[str | int, tuple[Any, Any]]] = {}
        if graph.group_widgets is not None and isinstance(values, list) and \
                len(values) == len(graph.group_widgets) + sum(c for _, _, c in graph.group_widgets):
            position = 0
            for index, key, control in graph.group_widgets:
                out.setdefault(index, {})[key] = (values[position], values[position + 1] if control else None)
                position += 2 if control else 1
            for inp in instance.get("inputs") or []:  # a widget converted to an input on the instance
                widget = inp.get("widget") if isinstance(inp, dict) else None
                target = graph.group_widget_names.get(str(widget.get("name"))) if isinstance(widget, dict) else None
                primitive = self.primitive_source(path[:-1], inp.get("link")) if target else None
                if target and primitive:
                    index, key = target
                    control = primitive[1] if len(primitive) > 1 and primitive[1] in SEED_MODES else None
                    out.setdefault(index, {})[key] = (primitive[0], control)
            for index, targets in graph.group_reroutes.items():  # the widgets a Reroute feeds take its value
                for target, name in targets:
                    if "value" in out.get(index, {}):
                        out.setdefault(target, {})[name] = out[index]["value"]
        self.group_value_cache[path] = out
        return out

    def primitive_source(self, path: tuple[Any, ...], link_id: Any) -> list[Any] | None:
        """The values of the PrimitiveNode a link in the graph at ``path`` comes from (through Reroutes), or None:
        ComfyUI's frontend writes a PrimitiveNode's value into the group node's widget it feeds, and only that
        reaches the inner node (a link from another node to such a widget does not)."""
        graph, _ = self.contexts[path]
        seen: set[Any] = set()
        while link_id is not None and link_id not in seen:
            seen.add(link_id)
            link = graph.links.get(link_id)
            node = graph.nodes.get(link[0]) if link else None
            if node is None:
                return None
            if node.get("type") == "PrimitiveNode":
                values = node.get("widgets_values")
                return values if isinstance(values, list) and values else None
            if node.get("type") != "Reroute":
                return None
            link_id = next((i.get("link") for i in node.get("inputs") or [] if isinstance(i, dict)), None)
        return None

    def connect(self, found: tuple[str, Any, int] | tuple[str, Any], target: Any, slot: int, kind: str) -> int:
        """A link in the flat graph from what ``resolve`` found (a value becomes a PrimitiveNode holding it)."""
        if found[0] == "value":
            self.values += 1
            origin: Any = f"~value{self.values}"
            self.flat_nodes.append({"id": origin, "type": "PrimitiveNode", "mode": 0, "inputs": [], "outputs": [],
                                    "widgets_values": [found[1]]})
            origin_slot = 0
        else:
            origin, origin_slot = found[1], found[2]  # type: ignore[misc]
        link_id = len(self.flat_links) + 1
        self.flat_links.append([link_id, origin, origin_slot, target, slot, kind])
        return link_id

    def resolve(self, path: tuple[Any, ...], link_id: Any) -> tuple[str, Any, int] | tuple[str, Any] | None:
        """Where the link ``link_id`` of the graph at ``path`` really comes from: ("link", flat node id, slot),
        ("value", x) for a promoted widget, or None (nothing connected). Out through input nodes to the
        enclosing graph and into instances through their output nodes, one hop per turn of the loop."""
        seen: set[tuple[tuple[Any, ...], Any]] = set()
        while True:
            if (path, link_id) in seen or len(seen) > MAX_EXPANDED_NODES:
                raise SubgraphError(f"{self.source}: the links through subgraph inputs and outputs form a loop "
                                    f"(at {self.titles(path) or 'the top level'})")
            seen.add((path, link_id))
            graph, _ = self.contexts[path]
            link = graph.links.get(link_id)
            if link is None:
                return None
            origin, slot = link[0], link[1]
            if origin == SUBGRAPH_INPUT_ID:
                if not path:
                    return None
                inp = self.instance_input(path, slot)
                if inp is not None and inp.get("link") is not None:
                    path, link_id = path[:-1], inp["link"]
                    continue
                return None if graph.is_group else self.promoted_value(path, slot)
            node = graph.nodes.get(origin)
            if node is None:
                return None
            child = (*path, origin)
            if child in self.contexts:  # an expanded instance: follow its output inside
                inner, _ = self.contexts[child]
                path, link_id = child, inner.output_link(slot)
                continue
            inner = self.inner_graph(node, path)
            if inner is None:
                return ("link", self.flat_id(path, origin), slot)
            if node.get("mode", 0) != BYPASSED:
                return None  # a muted instance gives nothing
            out_type = (inner.links.get(inner.output_link(slot)) or (None,) * 5)[4]
            link_id = next((i.get("link") for i in node.get("inputs") or []
                            if isinstance(i, dict) and i.get("link") is not None and i.get("type") == out_type), None)
            if link_id is None:
                return None


def expand(data: dict[str, Any], source: str = "<workflow>") -> dict[str, Any]:
    """A UI-format workflow with every subgraph and group node instance replaced by the nodes inside it, ids
    as ComfyUI's execution ids (``"56:52"``), links rewired through the instances' inputs and outputs and
    promoted widget values pushed in. SubgraphError names ``source`` for what cannot be expanded."""
    return _Expander(data, source).expand()

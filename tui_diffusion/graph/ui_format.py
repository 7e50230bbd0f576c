"""ComfyUI's UI format (what its "Save" writes: nodes, links, widgets_values) to and from the API format.

The mapping follows ComfyUI's own graph-to-prompt conversion: widget values are matched to input
names in the node's declared order (a seed's hidden "control after generate" entry follows it), links
through Reroute nodes are followed to their source, PrimitiveNode values are pushed into the inputs
they feed, notes are dropped, muted nodes (mode 2) are left out and bypassed nodes (mode 4) pass their
inputs straight through. Subgraphs and group nodes are expanded first (``subgraphs.py``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.subgraphs import SubgraphError, expand, needs_expansion

MUTED, BYPASSED = 2, 4
VIRTUAL = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
SEED_MODES = ("fixed", "increment", "decrement", "randomize")
#: a node property holding the API format's other ``_meta`` keys, so that API -> UI -> API loses nothing
META_PROPERTY = "tui-diffusion meta"
#: ``_meta`` keys the UI format already carries in its own way
_META_IN_UI = ("title", "control_after_generate", "widgets_values")


class UIFormatError(ValueError):
    pass


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _links(data: dict[str, Any]) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type), from either link encoding ComfyUI has used."""
    out = {}
    for link in data.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else "*")
        elif isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", "*"))
    return out


def ui_to_api(data: dict[str, Any], source: str = "<workflow>") -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow into API format."""
    if needs_expansion(data):  # subgraphs and group nodes become the nodes inside them, ids as ComfyUI's
        try:
            data = expand(data, source)
        except SubgraphError as exc:
            raise UIFormatError(str(exc)) from None
    nodes = {n["id"]: n for n in data["nodes"]}
    links = _links(data)

    def origin(link_id: int | None) -> tuple[str, Any] | None:
        """Where a link's value comes from: ("link", [node id, slot]), ("value", x), or None (nothing).
        A loop, not recursion: a chain of thousands of Reroutes cannot exhaust the stack."""
        seen: set[Any] = set()
        while True:
            if link_id is None or link_id not in links or link_id in seen:
                return None
            seen.add(link_id)
            node_id, slot, link_type = links[link_id]
            node = nodes.get(node_id)
            if node is None:
                return None
            kind = node.get("type")
            mode = node.get("mode", 0)
            if kind == "Reroute":
                inputs = node.get("inputs") or []
                link_id = inputs[0].get("link") if inputs else None
                continue
            if kind == "PrimitiveNode":
                values = node.get("widgets_values") or []
                return ("value", values[0]) if values else None
            if mode == MUTED:
                return None
            if mode == BYPASSED:  # the output takes the first input of the same type
                outs = node.get("outputs") or []
                out_type = (outs[slot] if 0 <= slot < len(outs) else {}).get("type", link_type)
                link_id = next((inp["link"] for inp in node.get("inputs") or []
                                if inp.get("type") == out_type and inp.get("link") is not None), None)
                continue
            return ("link", [str(node_id), slot])

    api: dict[str, dict[str, Any]] = {}
    for node in data["nodes"]:
        kind = node.get("type")
        if kind in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        spec = get_spec(kind)
        inputs: dict[str, Any] = {}
        meta: dict[str, Any] = {"title": node.get("title") or (spec.display_name if spec else kind)}
        values = node.get("widgets_values")
        if isinstance(values, dict):  # newer frontends for some nodes: by name
            inputs.update({k: v for k, v in values.items() if spec and spec.input(k)})
        elif isinstance(values, list) and spec is not None:
            position = 0
            for ispec in spec.inputs:
                if not ispec.is_widget:
                    continue
                if position >= len(values):
                    break
                inputs[ispec.name] = values[position]
                position += 1
                # the seed's control widget ("randomize"..., or true/false in old files) follows it
                if ispec.control_after_generate and position < len(values) and (
                        isinstance(values[position], bool) or values[position] in SEED_MODES):
                    mode = values[position]
                    if isinstance(mode, str) and mode != "fixed":
                        meta.setdefault("control_after_generate", {})[ispec.name] = mode
                    position += 1
        elif isinstance(values, list) and values:
            meta["widgets_values"] = values  # an unknown node: keep what cannot be named
        if spec is not None:  # widgets the file leaves out have their defaults, as in ComfyUI's editor
            for ispec in spec.inputs:
                if ispec.is_widget and ispec.name not in inputs and ispec.default is not None:
                    inputs[ispec.name] = ispec.default
        for inp in node.get("inputs") or []:
            name = inp.get("name")
            if inp.get("link") is None:
                continue
            found = origin(inp["link"])
            if found is not None:
                inputs[name] = found[1]
            elif not (spec and spec.input(name) and spec.input(name).is_widget):
                inputs.pop(name, None)  # its source is muted: missing, as in ComfyUI (validation says so)
        props = node.get("properties")
        if isinstance(props, dict) and isinstance(props.get(META_PROPERTY), dict):  # ours, from api_to_ui
            meta.update({k: v for k, v in props[META_PROPERTY].items() if k not in meta})
        api[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": meta}
    return api


def api_to_ui(api: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A UI-format workflow ComfyUI opens: the same graph, nodes in columns by depth."""
    ids: dict[str, int] = {}
    next_id = max((int(n) for n in api if n.isdigit()), default=0) + 1
    for node_id in api:
        if node_id.isdigit():
            ids[node_id] = int(node_id)
        else:
            ids[node_id] = next_id
            next_id += 1
    from tui_diffusion.graph.workflow import link_depths  # workflow imports this module

    depths = link_depths(api)
    rows: dict[int, int] = defaultdict(int)
    links: list[list[Any]] = []
    nodes: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], list[int]] = defaultdict(list)
    order = sorted(api, key=lambda n: (depths.get(n, 0), ids[n]))
    for index, node_id in enumerate(order):
        node = api[node_id]
        spec = get_spec(node["class_type"])
        meta = node.get("_meta", {})
        controls = meta.get("control_after_generate", {})
        ui_inputs: list[dict[str, Any]] = []
        widgets: list[Any] = []
        names = [i.name for i in spec.inputs] if spec else list(node["inputs"])
        for name in names:
            ispec = spec.input(name) if spec else None
            value = node["inputs"].get(name, ispec.default if ispec else None)
            linked = isinstance(value, list) and len(value) == 2 and str(value[0]) in api
            if ispec is None or not ispec.is_widget:
                if not linked and ispec is None:
                    continue
                entry: dict[str, Any] = {"name": name, "type": ispec.type if ispec else "*", "link": None}
            else:
                widgets.append(ispec.default if linked else value)
                if ispec.control_after_generate:
                    widgets.append(controls.get(name, "fixed"))
                if not linked:
                    continue
                entry = {"name": name, "type": ispec.type, "link": None, "widget": {"name": name}}
            if linked:
                link_id = len(links) + 1
                src, slot = str(value[0]), int(value[1])
                src_spec = get_spec(api[src]["class_type"])
                link_type = src_spec.outputs[slot].type if src_spec and slot < len(src_spec.outputs) else "*"
                links.append([link_id, ids[src], slot, ids[node_id], len(ui_inputs), link_type])
                outputs[(src, slot)].append(link_id)
                entry["link"] = link_id
            ui_inputs.append(entry)
        column = depths.get(node_id, 0)
        properties: dict[str, Any] = {"Node name for S&R": node["class_type"]}
        extra = {k: v for k, v in meta.items() if k not in _META_IN_UI}
        if extra:  # e.g. a shipped workflow's description and family: kept where ComfyUI keeps node extras
            properties[META_PROPERTY] = extra
        nodes.append({
            "id": ids[node_id], "type": node["class_type"],
            "pos": [50 + 380 * column, 50 + 320 * rows[column]], "size": [320, 120 + 24 * len(widgets)],
            "flags": {}, "order": index, "mode": 0, "inputs": ui_inputs, "outputs": [],
            "properties": properties, "widgets_values": widgets,
            "title": meta.get("title") or (spec.display_name if spec else node["class_type"]),
        })
        rows[column] += 1
    by_id = {n["id"]: n for n in nodes}
    for node_id, node in api.items():
        spec = get_spec(node["class_type"])
        for slot, out in enumerate(spec.outputs if spec else ()):
            by_id[ids[node_id]]["outputs"].append({"name": out.name, "type": out.type,
                                                   "links": outputs.get((node_id, slot), []), "slot_index": slot})
    return {"last_node_id": max(ids.values(), default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}

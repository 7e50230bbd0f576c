"""Workflows in ComfyUI's API format: ``{id: {"class_type", "inputs", "_meta": {"title"}}}``.

Links are ``[source node id, output index]``. The in-memory form keeps the file's data as it is
(unknown keys survive a load/save round trip), with helpers to read and edit it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.ui_format import UIFormatError, api_to_ui, is_ui_format, ui_to_api
from tui_diffusion.text import printable


class WorkflowError(Exception):
    """A workflow file that cannot be read as a workflow; the message names the file."""


#: deeper than any real workflow (a link is two levels inside its node); deeper data would exhaust the
#: interpreter's stack when copied, compared or sent to the worker
MAX_DEPTH = 64
#: the largest workflow file read (ComfyUI's biggest real graphs are a few megabytes)
MAX_WORKFLOW_BYTES = 64 * 2**20


def nesting_error(data: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why ``data`` (parsed JSON) is too deep to handle, or None. Iterative: any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


#: the longest chain of linked nodes accepted: real graphs are a few dozen deep, and graph walks elsewhere
#: (validation, execution order, layout) may recurse once per link
MAX_CHAIN = 400


def link_depths(nodes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Each node's depth: 0 for a node with no linked inputs, else one more than its deepest source.
    Iterative, so a chain of any length is safe to measure; a cycle is cut where it closes (validation
    reports it)."""
    def ups(node_id: str) -> list[str]:
        return [link.node_id for v in nodes[node_id]["inputs"].values()
                if (link := as_link(v)) is not None and link.node_id in nodes]

    depth: dict[str, int] = {}
    for root in nodes:
        if root in depth:
            continue
        on_path = {root}
        stack: list[tuple[str, list[str]]] = [(root, ups(root))]
        while stack:
            node_id, pending = stack[-1]
            while pending and (pending[-1] in depth or pending[-1] in on_path):
                pending.pop()
            if pending:
                child = pending.pop()
                on_path.add(child)
                stack.append((child, ups(child)))
                continue
            stack.pop()
            on_path.discard(node_id)
            depth[node_id] = 1 + max((depth[u] for u in ups(node_id) if u in depth), default=-1)
    return depth


def _deepest_chain(nodes: dict[str, dict[str, Any]], limit: int = MAX_CHAIN) -> str | None:
    """A node at the end of a chain of more than ``limit`` links, or None."""
    return next((node_id for node_id, d in link_depths(nodes).items() if d + 1 > limit), None)


def parse_json(text: str | bytes, source: str) -> Any:
    """JSON text to data, every failure a WorkflowError naming ``source``: malformed text, nesting that
    would exhaust the stack, integers too long for Python to convert (over 4300 digits)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") \
            from None
    except RecursionError:
        raise WorkflowError(f"{source}: not a workflow: its JSON is nested too deeply") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise WorkflowError(f"{source}: not a workflow: {str(exc).split(';')[0]}") from None
    if (why := nesting_error(data)) is not None:
        raise WorkflowError(f"{source}: not a workflow: its JSON is {why}")
    return data


@dataclass(frozen=True)
class Link:
    node_id: str
    output_index: int


def as_link(value: Any) -> Link | None:
    """The link a raw input value denotes, or None for a literal."""
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    ):
        return Link(str(value[0]), value[1])
    return None


def _node_sort_key(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


class Workflow:
    """A mutable API-format workflow."""

    def __init__(self, nodes: dict[str, dict[str, Any]], source: str | None = None, source_format: str = "api") -> None:
        self.nodes = nodes
        self.source = source
        #: "api" or "ui": the format of the file it came from, which saving keeps
        self.source_format = source_format

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def from_data(cls, data: Any, source: str = "<workflow>") -> Workflow:
        """A workflow from parsed JSON (API or UI format, or a /prompt body); WorkflowError names ``source``."""
        if (why := nesting_error(data)) is not None:
            raise WorkflowError(f"{source}: not a workflow: its data is {why}")
        if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data:
            data = data["prompt"]  # the body ComfyUI's /prompt endpoint takes
        source_format = "api"
        if is_ui_format(data):
            source_format = "ui"
            try:
                data = ui_to_api(data, source)
            except UIFormatError as exc:
                raise WorkflowError(str(exc)) from None
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise WorkflowError(f"{source}: a malformed ComfyUI UI-format file ({type(exc).__name__}: {exc})") \
                    from None
        if not isinstance(data, dict) or not data:
            raise WorkflowError(f"{source}: not a workflow: expected a JSON object of nodes keyed by id")
        nodes: dict[str, dict[str, Any]] = {}
        for node_id, node in data.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise WorkflowError(f"{source}: not a workflow: node {node_id!r} has no 'class_type'")
            inputs = node.get("inputs", {})
            if not isinstance(inputs, dict):
                raise WorkflowError(f"{source}: node {node_id!r}: 'inputs' must be an object")
            nodes[str(node_id)] = {**copy.deepcopy(node), "inputs": copy.deepcopy(inputs)}
        if (deep := _deepest_chain(nodes)) is not None:
            raise WorkflowError(f"{source}: not a workflow this program runs: node {printable(deep)} ends a chain of "
                                f"more than {MAX_CHAIN} linked nodes")
        return cls(nodes, source, source_format)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Workflow:
        """A workflow file (API or UI format), or the workflow inside a PNG's metadata."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                is_png = f.read(4) == b"\x89PNG"
                f.seek(0)
                raw = b"" if is_png else f.read(MAX_WORKFLOW_BYTES + 1)
        except FileNotFoundError:
            raise WorkflowError(f"{path}: no such file") from None
        except OSError as exc:
            raise WorkflowError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if is_png:
            return cls.from_png(path)
        if len(raw) > MAX_WORKFLOW_BYTES:
            raise WorkflowError(f"{path}: larger than {MAX_WORKFLOW_BYTES // 2**20} MB: not a workflow")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WorkflowError(f"{path}: neither a JSON workflow nor a PNG image") from None
        return cls.from_data(parse_json(text, str(path)), str(path))

    @classmethod
    def from_png(cls, path: Path) -> Workflow:
        """The workflow a PNG carries: ours or ComfyUI's chunks, else rebuilt from A1111 parameters. Only the
        text chunks are read: no pixel is decoded, so an image's size cannot exhaust memory here."""
        from tui_diffusion.images import ImageFileError, png_text_chunks

        try:
            chunks = png_text_chunks(path)
        except ImageFileError as exc:
            raise WorkflowError(f"{path}: a damaged PNG ({exc})") from None
        except OSError as exc:
            raise WorkflowError(f"{path}: cannot read: {exc.strerror or exc}") from None
        problems = []
        for key in ("prompt", "workflow"):
            if key in chunks:
                try:
                    wf = cls.from_data(parse_json(chunks[key], f"{path}, its '{key}' chunk"), str(path))
                    wf.source_format = "api"  # saving writes a workflow file, never into the image
                    return wf
                except WorkflowError as exc:
                    problems.append(f"its '{key}' chunk is unreadable ({exc})")
        if "parameters" in chunks:
            from tui_diffusion.graph.a1111 import txt2img_from_parameters

            return cls.from_data(txt2img_from_parameters(chunks["parameters"]), str(path))
        detail = "; ".join(problems) if problems else "no 'prompt', 'workflow' or 'parameters' chunk"
        raise WorkflowError(f"{path}: this PNG holds no workflow ({detail})")

    # -- writing -----------------------------------------------------------------------------
    def to_data(self) -> dict[str, dict[str, Any]]:
        """Nodes in id order with a stable key order inside each node."""
        out: dict[str, dict[str, Any]] = {}
        for node_id in sorted(self.nodes, key=_node_sort_key):
            node = self.nodes[node_id]
            ordered = {"inputs": node["inputs"], "class_type": node["class_type"]}
            ordered.update({k: v for k, v in sorted(node.items()) if k not in ordered})
            out[node_id] = ordered
        return copy.deepcopy(out)

    def dumps(self, fmt: str = "api") -> str:
        data: Any = self.to_data() if fmt == "api" else api_to_ui(self.to_data())
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike[str], fmt: str | None = None) -> None:
        """Write atomically (a temporary file in the same folder, then rename), in ``fmt`` ("api" or "ui";
        default: the format the workflow was read from)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.dumps(fmt or self.source_format), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # -- access and editing ------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.nodes, key=_node_sort_key))

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def class_type(self, node_id: str) -> str:
        return self.nodes[node_id]["class_type"]

    def title(self, node_id: str) -> str:
        """The node's title as shown: control characters escaped (a title is the workflow author's text)."""
        meta = self.nodes[node_id].get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get("title"), str) and meta["title"]:
            return printable(meta["title"])
        spec = get_spec(self.class_type(node_id))
        return spec.display_name if spec else printable(self.class_type(node_id))

    def inputs(self, node_id: str) -> dict[str, Any]:
        return self.nodes[node_id]["inputs"]

    def links(self, node_id: str) -> dict[str, Link]:
        return {name: link for name, value in self.inputs(node_id).items() if (link := as_link(value))}

    def set_input(self, node_id: str, name: str, value: Any) -> None:
        if node_id not in self.nodes:
            raise KeyError(f"no node {node_id!r} in the workflow")
        self.nodes[node_id]["inputs"][name] = value

    def copy(self) -> Workflow:
        return Workflow(copy.deepcopy(self.nodes), self.source, self.source_format)

    def describe(self, node_id: str) -> str:
        """How messages name a node: ``node 3 'KSampler'``."""
        return f"node {printable(node_id)} {self.title(node_id)!r}"

"""The workflow being edited in the TUI: its file, unsaved changes, undo/redo and graph edits.

Torch-free and widget-free, so every edit the app offers is testable without a terminal. Each
edit snapshots the nodes first; undo and redo swap snapshots.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_diffusion.graph.specs import MAX_SEED, NODE_SPECS, get_spec
from tui_diffusion.graph.validate import ValidationIssue, validate_workflow
from tui_diffusion.graph.workflow import Link, Workflow, as_link
from tui_diffusion.paths import ModelPaths
from tui_diffusion.settings import Limits
from tui_diffusion.text import printable

SEED_MODES = ("fixed", "increment", "decrement", "randomize")
UNDO_LIMIT = 200


@dataclass(frozen=True)
class OutputRef:
    """A node output that a link input can be connected to."""

    node_id: str
    index: int
    type: str
    label: str


class WorkflowDocument:
    def __init__(self, workflow: Workflow, path: Path | None = None) -> None:
        self.workflow = workflow
        self.path = path
        self._undo: list[dict[str, Any]] = []
        self._redo: list[dict[str, Any]] = []
        self._last_edit: tuple[str, str] | None = None
        self._saved = self._snapshot()
        #: what the user must be told once about how the file was opened (None: nothing)
        self.notice: str | None = None

    # -- files -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> WorkflowDocument:
        """A workflow file, or the workflow inside a PNG (then untitled: saving must not overwrite the image).

        A ComfyUI UI-format file's groups are kept in each node's ``_meta["group"]`` (the tree shows them as
        levels; saving in the API format keeps them).
        """
        from tui_diffusion.graph.subgraphs import needs_expansion

        workflow = Workflow.load(path)
        with open(path, "rb") as f:
            is_image = f.read(8).startswith(b"\x89PNG")
        flattened = False
        if not is_image and workflow.source_format == "ui":
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                data = None
            flattened = isinstance(data, dict) and needs_expansion(data)
            for node_id, group in ui_groups(data).items():
                if node_id in workflow.nodes:
                    workflow.nodes[node_id].setdefault("_meta", {})["group"] = group
        # subgraphs and group nodes were expanded on import: saving over the file would lose them
        document = cls(workflow, None if is_image or flattened else path)
        if flattened:
            document.notice = (f"{printable(Path(path).name)} uses subgraphs or group nodes, opened flattened as "
                               "untitled: saving writes a new file and leaves it as it is")
        return document

    def save(self, path: Path | None = None) -> Path:
        target = path or self.path
        if target is None:
            raise ValueError("no file name: use save as")
        self.workflow.save(target)
        self.path = target
        self._saved = self._snapshot()
        return target

    @property
    def dirty(self) -> bool:
        return self._snapshot() != self._saved

    @property
    def name(self) -> str:
        return self.path.name if self.path else "untitled.json"

    # -- undo/redo -----------------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.workflow.nodes)

    def _record(self) -> None:
        self._last_edit = None
        self._undo.append(self._snapshot())
        del self._undo[:-UNDO_LIMIT]
        self._redo.clear()

    def undo(self) -> bool:
        self._last_edit = None
        if not self._undo:
            return False
        self._redo.append(self._snapshot())
        self.workflow.nodes = self._undo.pop()
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        self._undo.append(self._snapshot())
        self.workflow.nodes = self._redo.pop()
        return True

    # -- edits -----------------------------------------------------------------------------------------
    def set_value(self, node_id: str, name: str, value: Any, coalesce: bool = False) -> bool:
        """Set a literal input; returns False when nothing changed (no undo step).

        With ``coalesce``, consecutive edits of the same input make one undo step (typing a prompt).
        """
        if self.workflow.inputs(node_id).get(name, object()) == value:
            return False
        if not (coalesce and self._last_edit == (node_id, name) and self._undo):
            self._record()
        self.workflow.set_input(node_id, name, value)
        self._last_edit = (node_id, name) if coalesce else None
        return True

    def link(self, node_id: str, name: str, source: OutputRef) -> None:
        self._record()
        self.workflow.set_input(node_id, name, [source.node_id, source.index])

    def unlink(self, node_id: str, name: str) -> None:
        """Disconnect an input: a widget input gets its default value back, a socket is left empty."""
        self._record()
        spec = get_spec(self.workflow.class_type(node_id))
        ispec = spec.input(name) if spec else None
        if ispec is not None and ispec.is_widget and ispec.default is not None:
            self.workflow.set_input(node_id, name, ispec.default)
        else:
            self.workflow.inputs(node_id).pop(name, None)

    def add_node(self, class_type: str) -> str:
        spec = NODE_SPECS[class_type]
        ids = [int(n) for n in self.workflow.nodes if n.isdigit()]
        node_id = str(max(ids, default=0) + 1)
        self._record()
        inputs = {i.name: i.default for i in spec.inputs if i.is_widget and i.default is not None}
        self.workflow.nodes[node_id] = {"inputs": inputs, "class_type": class_type,
                                        "_meta": {"title": spec.display_name}}
        return node_id

    def delete_node(self, node_id: str) -> None:
        """Remove a node and every link to it (as ComfyUI does)."""
        self._record()
        del self.workflow.nodes[node_id]
        for other in self.workflow.nodes:
            inputs = self.workflow.inputs(other)
            for name, value in list(inputs.items()):
                link = as_link(value)
                if link and link.node_id == node_id:
                    del inputs[name]

    def rename(self, node_id: str, title: str) -> None:
        self._record()
        self.workflow.nodes[node_id].setdefault("_meta", {})["title"] = title

    # -- queries -----------------------------------------------------------------------------------------
    def compatible_outputs(self, node_id: str, name: str) -> list[OutputRef]:
        spec = get_spec(self.workflow.class_type(node_id))
        ispec = spec.input(name) if spec else None
        if ispec is None:
            return []
        refs = []
        for other in self.workflow:
            if other == node_id:
                continue
            ospec = get_spec(self.workflow.class_type(other))
            for index, out in enumerate(ospec.outputs if ospec else ()):
                if out.type == ispec.type:
                    refs.append(OutputRef(other, index, out.type, f"{self.workflow.title(other)}.{out.name}"))
        return refs

    def group_path(self, node_id: str) -> tuple[str, ...]:
        """The groups a node sits in, outermost first (empty when ungrouped)."""
        group = self.workflow.nodes[node_id].get("_meta", {}).get("group")
        if isinstance(group, str):
            return (group,)
        if isinstance(group, list) and all(isinstance(g, str) for g in group):
            return tuple(group)
        return ()

    def link_label(self, link: Link) -> str:
        if link.node_id not in self.workflow:
            return f"from missing node {link.node_id}"
        spec = get_spec(self.workflow.class_type(link.node_id))
        outputs = spec.outputs if spec else ()
        out = outputs[link.output_index].name if 0 <= link.output_index < len(outputs) else str(link.output_index)
        return f"from {self.workflow.title(link.node_id)}.{out}"

    def validate(self, models: ModelPaths | None, limits: Limits | None = None,
                 allow_pickle: bool = False) -> list[ValidationIssue]:
        return validate_workflow(self.workflow, models, limits=limits, allow_pickle=allow_pickle)

    # -- seed control ("control after generate") ------------------------------------------------------------
    def seed_mode(self, node_id: str, name: str) -> str:
        meta = self.workflow.nodes[node_id].get("_meta", {})
        return meta.get("control_after_generate", {}).get(name, "fixed")

    def set_seed_mode(self, node_id: str, name: str, mode: str) -> None:
        if mode not in SEED_MODES:
            raise ValueError(f"unknown seed mode {mode!r}")
        if mode == self.seed_mode(node_id, name):
            return
        meta = self.workflow.nodes[node_id].setdefault("_meta", {})
        meta.setdefault("control_after_generate", {})[name] = mode

    def seed_inputs(self) -> list[tuple[str, str]]:
        out = []
        for node_id in self.workflow:
            spec = get_spec(self.workflow.class_type(node_id))
            for ispec in spec.inputs if spec else ():
                value = self.workflow.inputs(node_id).get(ispec.name)
                if ispec.control_after_generate and isinstance(value, int):
                    out.append((node_id, ispec.name))
        return out

    def after_queue(self, rng: random.Random | None = None) -> None:
        """Apply each seed's control mode, as ComfyUI does after a prompt is queued."""
        rng = rng or random.Random()
        for node_id, name in self.seed_inputs():
            mode = self.seed_mode(node_id, name)
            value = self.workflow.inputs(node_id)[name]
            if mode == "increment":
                self.set_value(node_id, name, min(value + 1, MAX_SEED))
            elif mode == "decrement":
                self.set_value(node_id, name, max(value - 1, 0))
            elif mode == "randomize":
                self.set_value(node_id, name, rng.randint(0, 2**50))


def ui_groups(data: Any) -> dict[str, list[str]]:
    """Which groups of a ComfyUI UI-format file each node sits in, outermost first.

    As in ComfyUI's editor, a node belongs to a group when it lies inside the group's bounding box
    (``[x, y, width, height]``); here its centre decides. Nested groups give a path of titles.
    """
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list) or not isinstance(data.get("nodes"),
                                                                                                 list):
        return {}
    boxes: list[tuple[float, str, tuple[float, float, float, float]]] = []
    for group in data["groups"]:
        try:
            x, y, w, h = (float(v) for v in group["bounding"][:4])
        except (KeyError, TypeError, ValueError):
            continue
        boxes.append((w * h, str(group.get("title") or "Group"), (x, y, w, h)))
    boxes.sort(key=lambda b: -b[0])  # outermost first
    out: dict[str, list[str]] = {}
    for node in data["nodes"]:
        try:
            px, py = (float(v) for v in node["pos"][:2])
            sw, sh = (float(v) for v in (node.get("size") or [0, 0])[:2]) if isinstance(node.get("size"), list) \
                else (0.0, 0.0)
            node_id = str(node["id"])
        except (KeyError, TypeError, ValueError):
            continue
        cx, cy = px + sw / 2, py + sh / 2
        path = [title for _, title, (x, y, w, h) in boxes if x <= cx <= x + w and y <= cy <= y + h]
        if path:
            out[node_id] = path
    return out

"""The workflows shipped with the program: where they are, what each is for, and names that find them.

They live in the repository's top-level ``workflows/`` and are installed as package data
(``tui_diffusion/workflows/``, mapped in pyproject.toml), so ``tui-diffusion run txt2img`` works from any folder
after a plain ``pip install``, not only in a checkout. What a workflow is for is read from its own data: each
checkpoint loader's ``_meta.family`` lists the model families it is made for (the first suits its sizes) and the
output node's ``_meta.description`` says in one line what it makes. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.workflow import WorkflowError

#: labels of the family ids the shipped workflows name (the registry in ``tui_diffusion.families`` is the
#: authority for loading; this is only for printing, and unknown ids print as themselves)
#: folders of the models a workflow is built around: their loaders' ``_meta.family`` is read
MODEL_KINDS = ("checkpoints", "diffusion_models")

FAMILY_LABELS = {"sd1": "SD1.x", "sd1-inpaint": "SD1.x inpainting", "sd2": "SD2.x", "sd2-inpaint": "SD2.x inpainting",
                 "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner", "sd3": "SD3", "flux": "Flux"}


def shipped_workflows_dir() -> Path:
    """The folder of the shipped workflows: the package data of an installed wheel, else the checkout's (an
    editable install or running from the source tree)."""
    here = Path(__file__).resolve().parent
    installed = here / "workflows"
    if installed.is_dir():
        return installed
    return here.parent / "workflows"


@dataclass(frozen=True)
class Requirement:
    """One model file or image a workflow needs: which node, which folder, and (for checkpoints) which families."""

    node_id: str
    title: str
    #: the input that names the file
    input: str
    kind: str
    #: model families this node is made for (model loaders only; empty: any)
    families: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShippedWorkflow:
    name: str
    path: Path
    description: str
    requirements: tuple[Requirement, ...] = field(default=())

    @property
    def families(self) -> tuple[str, ...]:
        """The families of its first model loader (the model it is built around)."""
        return next((r.families for r in self.requirements if r.families), ())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "description": self.description,
                "families": list(self.families),
                "needs": [{"node": r.node_id, "title": r.title, "input": r.input, "folder": r.kind,
                           "families": list(r.families)}
                          for r in self.requirements]}


def family_label(family_id: str) -> str:
    return FAMILY_LABELS.get(family_id, family_id)


def describe(path: Path) -> ShippedWorkflow:
    """Read one workflow file's catalogue facts; WorkflowError when it is not a readable API-format workflow."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise WorkflowError(f"{path}: cannot read this workflow: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: not an API-format workflow")
    description = ""
    needs: list[Requirement] = []
    # in id order, numbers as numbers (compared by length first: no int() of a huge id)
    for node_id, node in sorted(data.items(), key=lambda kv: (not kv[0].isdigit(), len(kv[0]), kv[0])):
        if not isinstance(node, dict):
            continue
        meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
        if isinstance(meta.get("description"), str) and not description:
            description = meta["description"]
        spec = get_spec(str(node.get("class_type")))
        if spec is None:
            continue
        title = str(meta.get("title") or spec.display_name)
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        for ispec in spec.inputs:
            if ispec.choices_from and not isinstance(inputs.get(ispec.name), list):  # a literal file name
                families = meta.get("family") if ispec.choices_from in MODEL_KINDS else None
                fams = tuple(str(f) for f in families) if isinstance(families, list) else ()
                needs.append(Requirement(str(node_id), title, ispec.name, ispec.choices_from, fams))
    return ShippedWorkflow(path.stem, path, description or "(no description)", tuple(needs))


def shipped_workflows() -> list[ShippedWorkflow]:
    """Every shipped workflow, by name; one that cannot be read is left out (the tests read them all)."""
    out = []
    for path in sorted(shipped_workflows_dir().glob("*.json"), key=lambda p: p.stem):
        try:
            out.append(describe(path))
        except WorkflowError:
            continue
    return out


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_workflows_dir().glob("*.json"))


def resolve_workflow(arg: str | Path) -> Path:
    """The file a workflow argument means: an existing path as given, else a shipped workflow by its name
    (``txt2img``, ``txt2img.json``, or ``workflows/txt2img.json`` as the hints of older versions wrote it).

    WorkflowError when it is neither, listing the shipped names.
    """
    path = Path(arg)
    if path.exists():
        return path
    text = str(arg)
    parts = Path(text).parts
    name = None
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2 and parts[0] == "workflows":
        name = parts[1]
    if name is not None:
        candidate = shipped_workflows_dir() / (name if name.endswith(".json") else f"{name}.json")
        if candidate.is_file():
            return candidate
    shipped = ", ".join(shipped_names()) or "none found"
    raise WorkflowError(f"{text}: no such file, and not the name of a shipped workflow (shipped: {shipped}; "
                        "'tui-diffusion workflows' lists them)")

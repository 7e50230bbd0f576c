"""Validation before anything runs: every problem at once, each naming node, title and input."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tui_diffusion.graph.samplers import combination_error
from tui_diffusion.graph.specs import BOOLEAN, COMBO, FLOAT, INT, STRING, InputSpec, NodeSpec, get_spec
from tui_diffusion.graph.workflow import Workflow, as_link
from tui_diffusion.paths import PICKLE_SUFFIXES, ModelPaths, PathError, check_output_prefix
from tui_diffusion.settings import Limits


@dataclass(frozen=True)
class ValidationIssue:
    node_id: str | None
    title: str | None
    input: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.node_id is not None:
            where.append(f"node {self.node_id} {self.title!r}")
        if self.input is not None:
            where.append(f"input {self.input!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else str(int(x)) if x.is_integer() else str(x)  # no float(10**400)


def check_value(spec: InputSpec, value: Any, models: ModelPaths | None = None,
                allow_pickle: bool = False) -> str | None:
    """Why a literal ``value`` is not acceptable for ``spec``, or None. Also used by the TUI's forms."""
    t = spec.type
    if t == INT:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            return f"{value!r} is not an integer"
        value = int(value)
    elif t == FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):  # an int is finite (and may not fit a float)
            return f"{value!r} is not a number"
    elif t == STRING:
        if not isinstance(value, str):
            return f"{value!r} is not a string"
        return check_output_prefix(value) if spec.name == "filename_prefix" else None
    elif t == BOOLEAN:
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    elif t == COMBO:
        if not isinstance(value, str):
            return f"{value!r} is not one of the choices"
        if spec.choices is not None and value not in spec.choices:
            return f"{value!r} is not one of: {', '.join(spec.choices)}"
        if spec.supported is not None and value not in spec.supported:
            runs = ", ".join(spec.supported)
            return f"{value!r} is ComfyUI's, but this program does not run it yet (it runs: {runs})"
        if spec.choices_from is not None and models is not None:
            return _check_model_file(spec.choices_from, value, models, allow_pickle)
        return None
    if spec.min is not None and value < spec.min:
        return f"{_fmt(value)} is below the minimum {_fmt(spec.min)}"
    if spec.max is not None and value > spec.max:
        return f"{_fmt(value)} is above the maximum {_fmt(spec.max)}"
    if spec.multiple_of_step and spec.step and value % spec.step:
        return f"{_fmt(value)} is not a multiple of {_fmt(spec.step)}"
    return None


def _check_model_file(kind: str, name: str, models: ModelPaths, allow_pickle: bool = False) -> str | None:
    try:
        path = models.resolve(kind, name)
    except PathError as exc:
        available = models.list(kind)
        if available:
            hint = f" (available: {', '.join(available[:8])})"
        elif kind == "checkpoints":
            hint = (" (the folder holds no models: download a checkpoint, e.g. from civitai.com, into it, "
                    "or write a random-weight one with 'tui-diffusion demo-checkpoint')")
        elif kind == "input":
            hint = " (put the image in that folder, or point --input-dir at the folder that has it)"
        else:
            hint = " (the folder is empty)"
        return f"{exc}{hint}"
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        return (f"{path}: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded and are refused; "
                "use the .safetensors version of the model, or allow them with --allow-pickle")
    return None


#: inputs that size what a node allocates (on nodes that output latents or images)
_SIDES = ("width", "height")
_BATCH = ("batch_size", "amount")


def limit_error(spec: NodeSpec, name: str, value: Any, limits: Limits) -> str | None:
    """Why a literal value exceeds the machine's configured bounds, or None."""
    allocates = any(o.type in ("LATENT", "IMAGE", "MASK") for o in spec.outputs)
    if allocates and name in _SIDES and isinstance(value, int) and value > limits.max_side:
        return f"{value} is above this machine's limit of {limits.max_side} pixels (setting max_side)"
    if name in _BATCH and isinstance(value, int) and value > limits.max_batch:
        return f"{value} is above this machine's limit of {limits.max_batch} images per batch (setting max_batch)"
    if isinstance(value, str) and len(value) > limits.max_prompt_chars:
        return (f"the text is {len(value)} characters, above this machine's limit of {limits.max_prompt_chars} "
                "(setting max_prompt_chars)")
    return None


def _needed_nodes(wf: Workflow) -> list[str]:
    """Ids of the output nodes and everything upstream of them, in id order."""
    outputs = [n for n in wf if (s := get_spec(wf.class_type(n))) and s.output_node]
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in wf:
            continue
        seen.add(node_id)
        stack.extend(link.node_id for link in wf.links(node_id).values())
    return [n for n in wf if n in seen]


def _find_cycle(wf: Workflow, nodes: list[str]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for link in wf.links(n).values():
            m = link.node_id
            if m not in wf:
                continue
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in nodes:
        if n not in state and (found := visit(n)):
            return found
    return None


def _check_node(wf: Workflow, node_id: str, spec: NodeSpec, models: ModelPaths | None, limits: Limits,
                allow_pickle: bool) -> list[ValidationIssue]:
    title = wf.title(node_id)
    issues: list[ValidationIssue] = []

    def add(inp: str | None, msg: str) -> None:
        issues.append(ValidationIssue(node_id, title, inp, msg))

    inputs = wf.inputs(node_id)
    for ispec in spec.inputs:
        if ispec.name not in inputs:
            if not ispec.optional and not (ispec.is_widget and ispec.default is not None):
                add(ispec.name, "required input is missing")
            continue
        value = inputs[ispec.name]
        link = as_link(value)
        if link is None:
            if not ispec.is_widget:
                add(ispec.name, f"must be linked to a {ispec.type} output, got the value {value!r}")
            elif (why := check_value(ispec, value, models, allow_pickle)) is not None:
                add(ispec.name, why)
            elif (why := limit_error(spec, ispec.name, value, limits)) is not None:
                add(ispec.name, why)
            continue
        if link.node_id not in wf:
            add(ispec.name, f"linked to node {link.node_id}, which is not in the workflow")
            continue
        src_spec = get_spec(wf.class_type(link.node_id))
        if src_spec is None:
            continue  # reported as an unknown class_type
        if not 0 <= link.output_index < len(src_spec.outputs):
            add(ispec.name, f"linked to output {link.output_index} of {wf.describe(link.node_id)}, "
                            f"which has {len(src_spec.outputs)} output(s)")
            continue
        out_type = src_spec.outputs[link.output_index].type
        if out_type != ispec.type and not (ispec.type == COMBO and out_type == COMBO):
            add(ispec.name, f"expects {ispec.type} but is linked to {out_type} "
                            f"(output {link.output_index} of {wf.describe(link.node_id)})")
    if spec.class_type in ("KSampler", "KSamplerAdvanced"):
        s, sch = inputs.get("sampler_name"), inputs.get("scheduler")
        if isinstance(s, str) and isinstance(sch, str) and (why := combination_error(s, sch)):
            add("scheduler", why)
    return issues


@functools.lru_cache(maxsize=1)
def comfy_core_nodes() -> frozenset[str]:
    """ComfyUI's core node class names (derived from its source and templates by tools/comfy_core_nodes.py)."""
    text = resources.files("tui_diffusion.graph").joinpath("comfy_core_nodes.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _missing_types(wf: Workflow) -> list[ValidationIssue]:
    """Every node type the workflow needs and this program lacks, all named at once (first a summary, then one
    issue per node), each said to be a custom node (not in ComfyUI's core) or a core node not implemented yet."""
    missing: dict[str, list[str]] = {}
    for node_id in wf:
        if get_spec(wf.class_type(node_id)) is None:
            missing.setdefault(wf.class_type(node_id), []).append(node_id)
    if not missing:
        return []
    core = comfy_core_nodes()
    custom = [t for t in missing if t.strip() not in core]
    builtin = [t for t in missing if t.strip() in core]

    def names(types: list[str]) -> str:
        return ", ".join(f"{t!r} (node{'s' if len(missing[t]) > 1 else ''} {', '.join(missing[t][:5])}"
                         f"{', ...' if len(missing[t]) > 5 else ''})" for t in types)

    parts = []
    if custom:
        parts.append(f"custom nodes (not in ComfyUI's core; this program has no custom nodes): {names(custom)}")
    if builtin:
        parts.append(f"ComfyUI core nodes this program does not implement yet: {names(builtin)}")
    count = f"{len(missing)} node type{'s' if len(missing) > 1 else ''}"
    issues = [ValidationIssue(None, None, None, f"the workflow needs {count} this program lacks: "
                                                + "; ".join(parts))]
    for kind, node_ids in missing.items():
        why = ("is a custom node type (not in ComfyUI's core), which this program does not have" if kind in custom
               else "is a ComfyUI core node type this program does not implement yet")
        issues.extend(ValidationIssue(n, wf.title(n), None, f"{kind!r} {why}") for n in node_ids)
    return issues


def validate_workflow(wf: Workflow, models: ModelPaths | None = None, *, limits: Limits | None = None,
                      allow_pickle: bool = False) -> list[ValidationIssue]:
    """All problems that would stop ``wf`` from running; an empty list when it can run."""
    limits = limits or Limits()
    issues = _missing_types(wf)
    needed = _needed_nodes(wf)
    if not needed:
        issues.append(ValidationIssue(None, None, None,
                                      "the workflow has no output node (such as SaveImage or PreviewImage)"))
        return issues
    for node_id in needed:
        spec = get_spec(wf.class_type(node_id))
        if spec is not None:
            issues.extend(_check_node(wf, node_id, spec, models, limits, allow_pickle))
    if cycle := _find_cycle(wf, needed):
        first = cycle[0]
        issues.append(ValidationIssue(first, wf.title(first), None,
                                      "the graph has a cycle: " + " -> ".join(cycle)))
    return issues

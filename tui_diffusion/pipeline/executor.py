"""Run a workflow: only what the output nodes need, in dependency order, reusing cached outputs.

A node's cache key is content-based, as in ComfyUI: its class_type, its literal inputs, the
fingerprint (size, mtime) of any model file it names, and for each link the upstream node's key
and output index. Changing the seed therefore changes the keys of KSampler and everything
downstream of it, and nothing else. The output cache keeps the outputs of the last job's nodes;
loaded checkpoints are kept separately (ModelCache), so switching between a few models is cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow, as_link
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import PathError
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.errors import Interrupted, NodeError
from tui_diffusion.pipeline.registry import NodeResult, implementations
from tui_diffusion.settings import Limits

log = logging.getLogger(__name__)


class JobError(Exception):
    def __init__(self, node_id: str | None, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.message = message


@dataclass
class JobReport:
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)


class Hooks:
    """What the executor tells its caller (the worker turns these into messages)."""

    def node_started(self, node_id: str) -> None: ...
    def node_cached(self, node_id: str) -> None: ...
    def node_finished(self, node_id: str, seconds: float) -> None: ...
    def progress(self, node_id: str, step: int, total: int, preview: Any) -> None: ...


def execution_order(wf: Workflow) -> list[str]:
    """Post-order from the output nodes (in id order): every node after the nodes it depends on."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for link in wf.links(node_id).values():
            visit(link.node_id)
        order.append(node_id)

    for node_id in wf:
        spec = get_spec(wf.class_type(node_id))
        if spec is not None and spec.output_node:
            visit(node_id)
    return order


def output_limit_error(result: NodeResult, limits: Limits) -> str | None:
    """Sizes reached at run time (an upscale by a factor, a batch repeated) checked against the bounds, so a
    chain of nodes cannot grow past them either."""
    for out in result.outputs:
        tensor, scale = None, 1
        if isinstance(out, dict) and hasattr(out.get("samples"), "shape"):  # LATENT: [batch, channels, h, w]
            tensor, scale = out["samples"], 8
            batch, height, width = tensor.shape[0], tensor.shape[-2], tensor.shape[-1]
        elif hasattr(out, "shape") and getattr(out, "ndim", 0) == 4 and out.shape[-1] in (1, 3, 4):  # IMAGE
            tensor = out
            batch, height, width = out.shape[0], out.shape[1], out.shape[2]
        if tensor is None:
            continue
        if max(height, width) * scale > limits.max_side:
            return (f"its output is {width * scale}x{height * scale}, above this machine's limit of "
                    f"{limits.max_side} pixels (setting max_side)")
        if batch > limits.max_batch:
            return f"its output is a batch of {batch}, above this machine's limit of {limits.max_batch} (max_batch)"
    return None


def _files_missing(result: NodeResult) -> bool:
    """Whether an output node's files are gone (deleted, moved): then it runs again rather than report them."""
    return any(not os.path.isfile(path) for path in result.files)


class Executor:
    def __init__(self, engine: EngineState) -> None:
        self.engine = engine
        self.cache: dict[str, NodeResult] = {}

    def cache_keys(self, wf: Workflow, order: list[str]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for node_id in order:
            spec = get_spec(wf.class_type(node_id))
            parts: dict[str, Any] = {"class_type": wf.class_type(node_id), "inputs": {}}
            for name, value in sorted(wf.inputs(node_id).items()):
                link = as_link(value)
                if link is not None:
                    parts["inputs"][name] = ["link", keys[link.node_id], link.output_index]
                    continue
                parts["inputs"][name] = value
                ispec = spec.input(name) if spec else None
                if ispec is not None and ispec.choices_from and isinstance(value, str):
                    try:
                        parts["inputs"][name] = [value, self.engine.paths.fingerprint(ispec.choices_from, value)]
                    except (PathError, OSError):
                        pass  # reported when the node runs
            blob = json.dumps(parts, sort_keys=True, default=str).encode()
            keys[node_id] = hashlib.sha256(blob).hexdigest()
        return keys

    def _inputs(self, wf: Workflow, node_id: str, results: dict[str, NodeResult]) -> dict[str, Any]:
        spec = get_spec(wf.class_type(node_id))
        assert spec is not None
        kwargs: dict[str, Any] = {}
        given = wf.inputs(node_id)
        for ispec in spec.inputs:
            if ispec.name not in given:
                if ispec.default is not None:
                    kwargs[ispec.name] = ispec.default
                continue
            value = given[ispec.name]
            link = as_link(value)
            kwargs[ispec.name] = results[link.node_id].outputs[link.output_index] if link else value
        return kwargs

    def run(self, workflow: dict[str, Any], hooks: Hooks, interrupted: Callable[[], bool],
            previews: bool = False) -> JobReport:
        wf = Workflow.from_data(workflow, "<job>")
        issues = validate_workflow(wf, self.engine.paths, limits=self.engine.limits,
                                   allow_pickle=self.engine.allow_pickle)
        if issues:
            first = issues[0]
            raise JobError(first.node_id, "; ".join(str(i) for i in issues))
        order = execution_order(wf)
        keys = self.cache_keys(wf, order)
        report = JobReport()
        results: dict[str, NodeResult] = {}
        for node_id in order:
            key = keys[node_id]
            if key in self.cache and not _files_missing(self.cache[key]):
                results[node_id] = self.cache[key]
                report.cached.append(node_id)
                hooks.node_cached(node_id)
            else:
                if interrupted():
                    raise Interrupted()
                hooks.node_started(node_id)
                ctx = NodeContext(
                    self.engine, node_id, workflow,
                    report=lambda step, total, preview, _n=node_id: hooks.progress(_n, step, total, preview),
                    interrupted=interrupted, want_previews=previews,
                )
                fn = implementations()[wf.class_type(node_id)]
                start = time.perf_counter()
                try:
                    result = fn(ctx, **self._inputs(wf, node_id, results))
                except Interrupted:
                    raise
                except (NodeError, CheckpointError, PathError) as exc:
                    raise JobError(node_id, f"{wf.describe(node_id)}: {exc}") from None
                except MemoryError:
                    raise JobError(node_id, f"{wf.describe(node_id)}: out of memory; try a smaller image or "
                                            "batch, or --lowvram on a GPU") from None
                except Exception as exc:
                    if type(exc).__name__ == "OutOfMemoryError":
                        raise JobError(node_id, f"{wf.describe(node_id)}: out of GPU memory; try a smaller "
                                                "image or batch, or --lowvram") from None
                    log.exception("node %s failed", node_id)
                    raise JobError(node_id, f"{wf.describe(node_id)}: {type(exc).__name__}: {exc}") from None
                seconds = time.perf_counter() - start
                if (why := output_limit_error(result, self.engine.limits)) is not None:
                    raise JobError(node_id, f"{wf.describe(node_id)}: {why}")
                results[node_id] = result
                self.cache[key] = result
                report.executed.append(node_id)
                report.timings[node_id] = seconds
                hooks.node_finished(node_id, seconds)
            spec = get_spec(wf.class_type(node_id))
            if spec is not None and spec.output_node:
                report.outputs.extend(results[node_id].files)
        # keep only what this job used: bounded memory, and the next job most likely shares it
        self.cache = {keys[n]: results[n] for n in order}
        return report

"""Model merging nodes and CheckpointSave (specs in graph/specs_merge.py; the merge itself in pipeline/merge.py).

Each merge returns the first model's handle with one ``MergePatch`` more: no weights are copied, and the
handles the inputs came from (cached by the executor) are left as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tui_diffusion.graph.specs_merge import BASIC_BLOCKS, SD1_BLOCKS, SDXL_BLOCKS
from tui_diffusion.pipeline.checkpoint_save import save_checkpoint
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.merge import CLIP_SKIP, MergePatch, block_merge, check_same_architecture
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle, VaeHandle
from tui_diffusion.pipeline.registry import NodeResult, node


def _check_model(name: str, value: Any) -> ModelHandle:
    if not isinstance(value, ModelHandle):
        raise NodeError(f"{name}: not a MODEL (connect a checkpoint loader's MODEL)")
    return value


def _check_clip(name: str, value: Any) -> ClipHandle:
    if not isinstance(value, ClipHandle):
        raise NodeError(f"{name}: not a CLIP (connect a checkpoint or CLIP loader's CLIP)")
    return value


def _merge_models(model1: Any, model2: Any, keep: float, take: float,
                  per_name: dict[str, tuple[float, float]] | None = None) -> NodeResult:
    m1, m2 = _check_model("model1", model1), _check_model("model2", model2)
    check_same_architecture({"unet": m1.unet}, {"unet": m2.unet}, f"model1 (a {m1.family.label} model)",
                            f"model2 (a {m2.family.label} model)")
    patch = MergePatch({"unet": m2.unet}, tuple(m2.patches), keep, take, per_name)
    if patch.strength == 0.0:
        return NodeResult((m1,))  # nothing of model2 is taken: model1 as it is
    return NodeResult((dataclasses.replace(m1, patches=(*m1.patches, patch)),))


def _merge_clips(clip1: Any, clip2: Any, keep: float, take: float) -> NodeResult:
    c1, c2 = _check_clip("clip1", clip1), _check_clip("clip2", clip2)
    check_same_architecture(c1.parts(), c2.parts(), "clip1", "clip2")
    patch = MergePatch(c2.parts(), tuple(c2.patches), keep, take, skip=CLIP_SKIP)
    if patch.strength == 0.0:
        return NodeResult((c1,))
    return NodeResult((dataclasses.replace(c1, patches=(*c1.patches, patch)),))


@node("ModelMergeSimple")
def model_merge_simple(ctx: NodeContext, model1: Any, model2: Any, ratio: float = 1.0) -> NodeResult:
    """model1 * ratio + model2 * (1 - ratio), per parameter."""
    return _merge_models(model1, model2, ratio, 1.0 - ratio)


@node("ModelMergeAdd")
def model_merge_add(ctx: NodeContext, model1: Any, model2: Any) -> NodeResult:
    return _merge_models(model1, model2, 1.0, 1.0)


@node("ModelMergeSubtract")
def model_merge_subtract(ctx: NodeContext, model1: Any, model2: Any, multiplier: float = 1.0) -> NodeResult:
    """(model1 - model2) * multiplier, as ComfyUI's add_patches(-m, m) makes it."""
    return _merge_models(model1, model2, multiplier, -multiplier)


def _blocks(model1: Any, model2: Any, names: tuple[str, ...], inputs: dict[str, Any]) -> NodeResult:
    """A ratio per block name, in the spec's order (the first is the default, as in ComfyUI)."""
    m1 = _check_model("model1", model1)
    ratios = {n: float(inputs.get(n, 1.0)) for n in names}
    per_name = block_merge(m1.unet, ratios)
    return _merge_models(model1, model2, ratios[names[0]], 1.0 - ratios[names[0]], per_name)


@node("ModelMergeBlocks")
def model_merge_blocks(ctx: NodeContext, model1: Any, model2: Any, **ratios: float) -> NodeResult:
    return _blocks(model1, model2, BASIC_BLOCKS, ratios)


@node("ModelMergeSD1")
def model_merge_sd1(ctx: NodeContext, model1: Any, model2: Any, **ratios: float) -> NodeResult:
    return _blocks(model1, model2, SD1_BLOCKS, ratios)


@node("ModelMergeSD2")
def model_merge_sd2(ctx: NodeContext, model1: Any, model2: Any, **ratios: float) -> NodeResult:
    return _blocks(model1, model2, SD1_BLOCKS, ratios)


@node("ModelMergeSDXL")
def model_merge_sdxl(ctx: NodeContext, model1: Any, model2: Any, **ratios: float) -> NodeResult:
    return _blocks(model1, model2, SDXL_BLOCKS, ratios)


@node("CLIPMergeSimple")
def clip_merge_simple(ctx: NodeContext, clip1: Any, clip2: Any, ratio: float = 1.0) -> NodeResult:
    return _merge_clips(clip1, clip2, ratio, 1.0 - ratio)


@node("CLIPMergeAdd")
def clip_merge_add(ctx: NodeContext, clip1: Any, clip2: Any) -> NodeResult:
    return _merge_clips(clip1, clip2, 1.0, 1.0)


@node("CLIPMergeSubtract")
def clip_merge_subtract(ctx: NodeContext, clip1: Any, clip2: Any, multiplier: float = 1.0) -> NodeResult:
    return _merge_clips(clip1, clip2, multiplier, -multiplier)


@node("CheckpointSave")
def checkpoint_save(ctx: NodeContext, model: Any, clip: Any, vae: Any,
                    filename_prefix: str = "checkpoints/ComfyUI") -> NodeResult:
    """One .safetensors in the original layout under the output folder, with the workflow in its metadata."""
    from tui_diffusion.graph.ui_format import api_to_ui

    model = _check_model("model", model)
    clip = _check_clip("clip", clip)
    if not isinstance(vae, VaeHandle):
        raise NodeError("vae: not a VAE (connect a checkpoint or VAE loader's VAE)")
    path = save_checkpoint(model, clip, vae, ctx.engine.output_dir, filename_prefix, prompt=ctx.workflow,
                           workflow=api_to_ui(ctx.workflow))
    return NodeResult((), [str(path)])

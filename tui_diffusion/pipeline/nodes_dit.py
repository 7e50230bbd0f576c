"""Nodes of the SD3/SD3.5 and Flux.1 workflows: separate-file loaders, their latent, model sampling and
conditioning nodes (specs in ``graph/specs.py``; ComfyUI's names, inputs and defaults).

``CheckpointLoaderSimple`` needs nothing here: the SD3 and Flux families (``families/sd3.py``, ``flux.py``)
recognise all-in-one checkpoints and load them through ``pipeline/models_dit.load_dit_checkpoint``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tui_diffusion.families import detect
from tui_diffusion.graph.specs import supported_choices
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle
from tui_diffusion.pipeline.models_dit import DitClip, TensorReader, load_text_encoders, load_transformer, model_handle
from tui_diffusion.pipeline.registry import NodeResult, node

#: the CLIPLoader/DualCLIPLoader types that load here (the others belong to families not supported yet)
SINGLE_TYPES = supported_choices("CLIPLoader", "type")
DUAL_TYPES = supported_choices("DualCLIPLoader", "type")


# -- loaders ----------------------------------------------------------------------------------------------------
@node("UNETLoader")
def unet_loader(ctx: NodeContext, unet_name: str, weight_dtype: str = "default") -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("diffusion_models", unet_name)

    def load() -> ModelHandle:
        try:
            header = read_header(path)
            family = detect(header)
            if hasattr(family, "load_diffusion_model"):  # a UNet family loaded from diffusion_models/ (Lotus)
                return family.load_diffusion_model(path, header, eng.device, weight_dtype)
            kind, transformer = load_transformer(TensorReader(path, header), eng.device, weight_dtype)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None
        return model_handle(kind, transformer, eng.device, str(path))

    return NodeResult((eng.models.get(key + repr(weight_dtype), load),))


def _load_clip(ctx: NodeContext, names: list[str], kind: str) -> ClipHandle:
    eng = ctx.engine
    files = [ctx.model_file("text_encoders", name) for name in names]

    def load() -> ClipHandle:
        try:
            return load_text_encoders([p for p, _ in files], kind, eng.device)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    clip = eng.models.get(repr(("clip", kind, [k for _, k in files])), load)
    return dataclasses.replace(clip, embeddings_dir=eng.paths.folder("embeddings"), allow_pickle=eng.allow_pickle)


@node("CLIPLoader")
def clip_loader(ctx: NodeContext, clip_name: str, type: str = "stable_diffusion",
                device: str = "default") -> NodeResult:
    if type not in SINGLE_TYPES:
        raise NodeError(f"CLIPLoader type {type!r} is not supported; supported: {', '.join(SINGLE_TYPES)}")
    return NodeResult((_load_clip(ctx, [clip_name], type),))


@node("DualCLIPLoader")
def dual_clip_loader(ctx: NodeContext, clip_name1: str, clip_name2: str, type: str = "sdxl",
                     device: str = "default") -> NodeResult:
    if type not in DUAL_TYPES:
        raise NodeError(f"DualCLIPLoader type {type!r} is not supported; supported: {', '.join(DUAL_TYPES)}")
    return NodeResult((_load_clip(ctx, [clip_name1, clip_name2], type),))


@node("TripleCLIPLoader")
def triple_clip_loader(ctx: NodeContext, clip_name1: str, clip_name2: str, clip_name3: str) -> NodeResult:
    return NodeResult((_load_clip(ctx, [clip_name1, clip_name2, clip_name3], "sd3"),))


# -- latent and model sampling ----------------------------------------------------------------------------------
@node("EmptySD3LatentImage")
def empty_sd3_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1) -> NodeResult:
    return NodeResult(({"samples": torch.zeros([batch_size, 16, height // 8, width // 8])},))


@node("ModelSamplingSD3")
def model_sampling_sd3(ctx: NodeContext, model: ModelHandle, shift: float = 3.0) -> NodeResult:
    from tui_diffusion.pipeline.model_sampling import DiscreteFlowSampling

    return NodeResult((dataclasses.replace(model, model_sampling_override=DiscreteFlowSampling(shift, 1000.0)),))


@node("ModelSamplingFlux")
def model_sampling_flux(ctx: NodeContext, model: ModelHandle, max_shift: float = 1.15, base_shift: float = 0.5,
                        width: int = 1024, height: int = 1024) -> NodeResult:
    from tui_diffusion.pipeline.model_sampling import FluxSampling, flux_resolution_shift

    if not model.family.resolution_shift:
        raise NodeError(f"ModelSamplingFlux needs a Flux model, not {model.family.label}")
    shift = flux_resolution_shift(width, height, max_shift, base_shift)
    return NodeResult((dataclasses.replace(model, model_sampling_override=FluxSampling(shift)),))


# -- conditioning -----------------------------------------------------------------------------------------------
def _dit_clip(clip: Any, kind: str, node_name: str) -> DitClip:
    if not isinstance(clip, DitClip) or clip.kind != kind:
        what = f"an {clip.kind.upper()} CLIP" if isinstance(clip, DitClip) else "a CLIP of another family"
        loader = "TripleCLIPLoader or DualCLIPLoader (type sd3)" if kind == "sd3" else "DualCLIPLoader (type flux)"
        raise NodeError(f"{node_name} needs {kind.upper()} text encoders ({loader}); it was given {what}")
    return clip


@node("CLIPTextEncodeSD3")
def clip_text_encode_sd3(ctx: NodeContext, clip: Any, clip_l: str = "", clip_g: str = "", t5xxl: str = "",
                         empty_padding: str = "none") -> NodeResult:
    sd3 = _dit_clip(clip, "sd3", "CLIPTextEncodeSD3")
    try:
        emb, pooled = sd3.encode_sd3(clip_l, clip_g, t5xxl, empty_padding=empty_padding == "empty_prompt")
    except CheckpointError as exc:
        raise NodeError(str(exc)) from None
    return NodeResult(([[emb, {"pooled_output": pooled}]],))


@node("CLIPTextEncodeFlux")
def clip_text_encode_flux(ctx: NodeContext, clip: Any, clip_l: str = "", t5xxl: str = "",
                          guidance: float = 3.5) -> NodeResult:
    flux = _dit_clip(clip, "flux", "CLIPTextEncodeFlux")
    emb, pooled = flux.encode_flux(clip_l, t5xxl)
    return NodeResult(([[emb, {"pooled_output": pooled, "guidance": guidance}]],))


@node("ConditioningZeroOut")
def conditioning_zero_out(ctx: NodeContext, conditioning: list) -> NodeResult:
    out = []
    for emb, extras in conditioning:
        extras = dict(extras)
        if extras.get("pooled_output") is not None:
            extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        out.append([torch.zeros_like(emb), extras])
    return NodeResult((out,))


@node("FluxGuidance")
def flux_guidance(ctx: NodeContext, conditioning: list, guidance: float = 3.5) -> NodeResult:
    return NodeResult(([[emb, {**extras, "guidance": guidance}] for emb, extras in conditioning],))

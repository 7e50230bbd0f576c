"""CLIP vision, style model and unCLIP nodes (ComfyUI's names and semantics; specs in ``graph/specs_vision.py``).

CLIPVisionEncode gives a ``clip_vision.ClipVisionOutput``. StyleModelApply appends a style model's tokens to each
conditioning entry's tokens (Flux Redux), as ComfyUI does: "multiply" scales the tokens; "attn_bias" records an
attention bias of log(strength) towards them in the entry's ``attention_mask`` (with ComfyUI's layout: text
tokens, then the image's, summarised by ``attention_mask_img_shape``), which the family turns into an attention
mask (Flux). unCLIPConditioning adds ``{clip_vision_output, strength, noise_augmentation}`` to the entry's
``unclip_conditioning`` list, which the sampler resolves with its seed (``clip_vision.resolve_unclip``): SDXL reads
it as revision (the noised image embedding replaces the pooled text), SD2.1 unCLIP as its UNet's class labels.
unCLIPCheckpointLoader adds the image encoder an unCLIP checkpoint holds to CheckpointLoaderSimple's outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline.clip_vision import (
    ClipVisionModel,
    ClipVisionOutput,
    StyleModel,
    load_clip_vision,
    load_style_model,
)
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.registry import NodeResult, node


def _cached(ctx: NodeContext, kind: str, name: str, loader: Any) -> Any:
    eng = ctx.engine
    path, key = ctx.model_file(kind, name)

    def load() -> Any:
        try:
            return loader(path, eng.device, eng.allow_pickle)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    return eng.models.get(key, load)


def _output(value: Any, name: str = "clip_vision_output") -> ClipVisionOutput:
    if not isinstance(value, ClipVisionOutput):
        raise NodeError(f"{name}: not a CLIP vision output (connect a CLIPVisionEncode)")
    return value


@node("CLIPVisionLoader")
def clip_vision_loader(ctx: NodeContext, clip_name: str) -> NodeResult:
    return NodeResult((_cached(ctx, "clip_vision", clip_name, load_clip_vision),))


class NoVision:
    """unCLIPCheckpointLoader's CLIP_VISION for a checkpoint without an image encoder (ComfyUI gives None); an
    error names the file when something uses it."""

    def __init__(self, source: str) -> None:
        self.source = source


@node("unCLIPCheckpointLoader")
def unclip_checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    """CheckpointLoaderSimple's outputs and the image encoder stored in the same file (``embedder.model.visual.``
    in SD2.1 unCLIP files)."""
    from tui_diffusion.pipeline.clip_vision import read_tower_state, vision_from_state
    from tui_diffusion.pipeline.nodes import checkpoint_loader

    model, clip, vae = checkpoint_loader(ctx, ckpt_name).outputs
    eng = ctx.engine
    path, key = ctx.model_file("checkpoints", ckpt_name)

    def load() -> Any:
        try:
            state = read_tower_state(path, eng.allow_pickle)
            if state is None:
                return NoVision(str(path))
            return vision_from_state(state, eng.device, str(path))
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    return NodeResult((model, clip, vae, eng.models.get(key + repr("clip_vision"), load)))


@node("CLIPVisionEncode")
def clip_vision_encode(ctx: NodeContext, clip_vision: Any, image: torch.Tensor, crop: str = "center") -> NodeResult:
    if isinstance(clip_vision, NoVision):
        raise NodeError(f"clip_vision: {clip_vision.source} holds no image encoder (not an unCLIP checkpoint); "
                        "load one with CLIPVisionLoader")
    if not isinstance(clip_vision, ClipVisionModel):
        raise NodeError("clip_vision: not a CLIP vision model (connect a CLIPVisionLoader)")
    if crop not in ("center", "none"):
        raise NodeError(f"crop: {crop!r} is not one of 'center', 'none'")
    return NodeResult((clip_vision.encode(image, crop=crop == "center"),))


@node("StyleModelLoader")
def style_model_loader(ctx: NodeContext, style_model_name: str) -> NodeResult:
    return NodeResult((_cached(ctx, "style_models", style_model_name, load_style_model),))


def attention_bias_mask(extras: dict, n_txt: int, n_new: int, batch: int, bias: float) -> torch.Tensor:
    """ComfyUI's mask after appending ``n_new`` tokens: the old mask (or zeros over the text and the image's
    ``attention_mask_img_shape`` cells) split around the new tokens, which every other token attends to with
    ``bias`` added."""
    h, w = extras.get("attention_mask_img_shape", (1, 1))
    n_ref = int(h) * int(w)
    mask = extras.get("attention_mask")
    if mask is None:
        mask = torch.zeros((batch, n_txt + n_ref, n_txt + n_ref), dtype=torch.float16)
    if mask.dtype == torch.bool:
        mask = torch.log(mask.to(torch.float16))
    mask = mask.cpu()
    size = n_txt + n_new + n_ref
    new = torch.zeros((mask.shape[0], size, size), dtype=torch.float16)
    t, e = n_txt, n_txt + n_new
    new[:, :t, :t] = mask[:, :t, :t]
    new[:, :t, e:] = mask[:, :t, t:]
    new[:, e:, :t] = mask[:, t:, :t]
    new[:, e:, e:] = mask[:, t:, t:]
    new[:, :t, t:e] = bias
    new[:, e:, t:e] = bias
    return new


@node("StyleModelApply")
def style_model_apply(ctx: NodeContext, conditioning: list, style_model: Any, clip_vision_output: Any,
                      strength: float = 1.0, strength_type: str = "multiply") -> NodeResult:
    if not isinstance(style_model, StyleModel):
        raise NodeError("style_model: not a style model (connect a StyleModelLoader)")
    if strength_type not in ("multiply", "attn_bias"):
        raise NodeError(f"strength_type: {strength_type!r} is not one of 'multiply', 'attn_bias'")
    output = _output(clip_vision_output)
    try:
        cond = style_model.get_cond(output)
    except ValueError as exc:
        raise NodeError(f"clip_vision_output: {exc}") from None
    cond = cond.flatten(0, 1).unsqueeze(0)  # every image's tokens in one row, as ComfyUI does
    if strength_type == "multiply":
        cond = cond * strength
    n = cond.shape[1]
    out = []
    for emb, extras in conditioning:
        extras = dict(extras)
        if "attention_mask" in extras or (strength_type == "attn_bias" and strength != 1.0):
            bias = float(torch.log(torch.tensor(strength if strength_type == "attn_bias" else 1.0)))
            extras["attention_mask"] = attention_bias_mask(extras, emb.shape[1], n, emb.shape[0], bias)
            extras["attention_mask_img_shape"] = extras.get("attention_mask_img_shape", (1, 1))
        tokens = cond.to(emb.dtype).expand(emb.shape[0], -1, -1)
        if tokens.shape[-1] != emb.shape[-1]:
            raise NodeError(f"the style model's tokens are {tokens.shape[-1]} wide but the conditioning's are "
                            f"{emb.shape[-1]}: Flux Redux goes with Flux's text encoders (T5), the T2I style "
                            "adapter with SD1.x's CLIP")
        out.append([torch.cat([emb, tokens], dim=1), extras])
    return NodeResult((out,))


@node("unCLIPConditioning")
def unclip_conditioning(ctx: NodeContext, conditioning: list, clip_vision_output: Any, strength: float = 1.0,
                        noise_augmentation: float = 0.0) -> NodeResult:
    output = _output(clip_vision_output)
    if strength == 0:
        return NodeResult((conditioning,))
    entry = {"clip_vision_output": output, "strength": strength, "noise_augmentation": noise_augmentation}
    out = []
    for emb, extras in conditioning:
        extras = dict(extras)
        extras["unclip_conditioning"] = list(extras.get("unclip_conditioning", [])) + [entry]
        out.append([emb, extras])
    return NodeResult((out,))

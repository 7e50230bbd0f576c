"""Nodes of the Flux.1 variants' workflows (Fill, Canny/Depth, Kontext), as ComfyUI's nodes of the same names
behave: conditioning that carries an image latent (and a mask) for the models with more input channels, reference
latents for Kontext, the image size Kontext prefers, and Differential Diffusion's soft inpainting masks.

How the carried values reach the transformer is the family's business (``families/flux.py``); Differential
Diffusion is a mask function the sampler's denoiser applies (``ModelHandle.denoise_mask_function``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.nodes_latent import common_upscale
from tui_diffusion.pipeline.registry import NodeResult, node

#: the sizes Flux Kontext was trained at (ComfyUI's PREFERED_KONTEXT_RESOLUTIONS), (width, height)
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def _crop_to_8(pixels: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels (and mask) cut to a multiple of 8, centred, as ComfyUI's conditioning nodes do before encoding."""
    h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
    if h == 0 or w == 0:
        raise NodeError("the image is smaller than 8 pixels")
    if (h, w) != tuple(pixels.shape[1:3]):
        y, x = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, y:y + h, x:x + w]
        if mask is not None:
            mask = mask[:, :, y:y + h, x:x + w]
    return pixels, mask


def _with(conditioning: list, values: dict[str, Any]) -> list:
    return [[emb, {**extras, **values}] for emb, extras in conditioning]


@node("InpaintModelConditioning")
@torch.inference_mode()
def inpaint_model_conditioning(ctx: NodeContext, positive: list, negative: list, vae: Any, pixels: torch.Tensor,
                               mask: torch.Tensor, noise_mask: bool = True) -> NodeResult:
    """The image with the masked area grey, encoded, for inpainting models' extra channels; the latent of the
    whole image (with the mask as its noise mask unless ``noise_mask`` is off)."""
    pixels = pixels[..., :3].float()
    mask = torch.nn.functional.interpolate(mask.float().reshape(-1, 1, *mask.shape[-2:]), size=pixels.shape[1:3],
                                           mode="bilinear")
    original = pixels
    pixels, mask = _crop_to_8(pixels, mask)
    keep = (1.0 - mask.round()).squeeze(1)[..., None]
    masked = (pixels - 0.5) * keep + 0.5
    concat = vae.encode(masked)
    latent: dict[str, Any] = {"samples": vae.encode(_crop_to_8(original)[0])}
    if noise_mask:
        latent["noise_mask"] = mask
    values = {"concat_latent_image": concat, "concat_mask": mask}
    return NodeResult((_with(positive, values), _with(negative, values), latent))


@node("InstructPixToPixConditioning")
@torch.inference_mode()
def instruct_pix_to_pix_conditioning(ctx: NodeContext, positive: list, negative: list, vae: Any,
                                     pixels: torch.Tensor) -> NodeResult:
    """The image's latent for the models that read it beside the noise (Flux Canny/Depth, InstructPix2Pix); an
    empty latent of its size to sample."""
    concat = vae.encode(_crop_to_8(pixels[..., :3].float())[0])
    values = {"concat_latent_image": concat}
    return NodeResult((_with(positive, values), _with(negative, values), {"samples": torch.zeros_like(concat)}))


@node("ReferenceLatent")
def reference_latent(ctx: NodeContext, conditioning: list, latent: dict | None = None) -> NodeResult:
    """Adds a latent to the conditioning's reference latents (Flux Kontext edits from them; chain for several)."""
    if latent is None:
        return NodeResult((conditioning,))
    return NodeResult(([[emb, {**extras, "reference_latents": [*(extras.get("reference_latents") or []),
                                                               latent["samples"]]}]
                        for emb, extras in conditioning],))


@node("FluxKontextImageScale")
def flux_kontext_image_scale(ctx: NodeContext, image: torch.Tensor) -> NodeResult:
    """The image resized (Lanczos, centre crop) to the Kontext size nearest its aspect ratio."""
    aspect = image.shape[2] / image.shape[1]
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    scaled = common_upscale(image.movedim(-1, 1).float(), width, height, "lanczos", "center")
    return NodeResult((scaled.movedim(1, -1),))


def differential_mask(strength: float) -> Any:
    """Differential Diffusion's mask function: at each step only the part of a soft noise mask at least as
    strong as the remaining share of the schedule (in timesteps) is denoised, blended with the soft mask by
    ``strength`` below 1."""

    def apply(sigma: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, model_sampling: Any) -> torch.Tensor:
        sigma_to = max(float(model_sampling.sigma_min), float(sigmas[-1]))
        ts_from = float(model_sampling.timestep(torch.as_tensor(float(sigmas[0]))))
        ts_to = float(model_sampling.timestep(torch.as_tensor(sigma_to)))
        now = float(model_sampling.timestep(torch.as_tensor(float(sigma.reshape(-1)[0]))))
        threshold = (now - ts_to) / (ts_from - ts_to) if ts_from != ts_to else 0.0
        binary = (mask >= threshold).to(mask.dtype)
        return strength * binary + (1 - strength) * mask if 0 < strength < 1 else binary

    return apply


@node("DifferentialDiffusion")
def differential_diffusion(ctx: NodeContext, model: ModelHandle, strength: float = 1.0) -> NodeResult:
    return NodeResult((dataclasses.replace(model, denoise_mask_function=differential_mask(strength)),))

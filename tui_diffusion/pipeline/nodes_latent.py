"""Latent, VAE and conditioning nodes beyond the core six (ComfyUI's semantics)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import VaeHandle, load_vae
from tui_diffusion.pipeline.registry import NodeResult, node


def _slerp_rows(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` and ``b`` [N, C] turned into each other by ``t`` [N, 1] along the great circle, their lengths
    interpolated linearly; rows pointing the same way are ``a``, opposite ones are interpolated linearly."""
    len_a, len_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(len_a == 0, torch.zeros_like(a), a / len_a)
    unit_b = torch.where(len_b == 0, torch.zeros_like(b), b / len_b)
    cos = (unit_a * unit_b).sum(-1, keepdim=True)
    angle = cos.acos()
    out = (((1 - t) * angle).sin() * unit_a + (t * angle).sin() * unit_b) / angle.sin()
    out = out * (len_a * (1 - t) + len_b * t)
    out = torch.where(cos > 1 - 1e-5, a, out)
    return torch.where(cos < 1e-5 - 1, a * (1 - t) + b * t, out)


def _axis_neighbours(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` positions on an axis of ``old``: the two source indices and the fraction between them,
    where bilinear resizing (half-pixel centres, clamped at the ends) samples."""
    grid = torch.arange(old, dtype=torch.float32).reshape(1, 1, 1, -1)
    where = F.interpolate(grid, size=(1, new), mode="bilinear").flatten()
    after = grid + 1
    after[..., -1] -= 1
    upper = F.interpolate(after, size=(1, new), mode="bilinear").flatten().to(torch.int64)
    return where.to(torch.int64), upper, where - where.floor()


def _slerp_axis(x: torch.Tensor, new: int, dim: int) -> torch.Tensor:
    """``x`` [N, C, H, W] resized along ``dim`` (2 or 3), each pixel's channel vector slerped between its two
    neighbours."""
    lower, upper, frac = _axis_neighbours(x.shape[dim], new)
    moved = x.movedim(dim, -1)  # [N, C, A, L]: the axis to resize last
    n, c, across = moved.shape[:3]

    def rows(v: torch.Tensor) -> torch.Tensor:
        return v.movedim(1, -1).reshape(-1, c)

    t = frac.reshape(1, 1, -1).expand(n, across, -1).reshape(-1, 1)
    out = _slerp_rows(rows(moved[..., lower]), rows(moved[..., upper]), t)
    return out.reshape(n, across, new, c).movedim(-1, 1).movedim(-1, dim)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's "bislerp" latent resize: bilinear sampling that slerps the channel vectors instead of mixing
    them linearly (width first, then height), so upscaled latents keep their vectors' lengths."""
    out = _slerp_axis(samples.float(), width, 3)
    return _slerp_axis(out, height, 2).to(samples.dtype)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """ComfyUI's common_upscale on [B,C,H,W]: optional centre crop to the target aspect, then resize."""
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        from PIL import Image

        images = []
        for img in samples.movedim(1, -1):
            pil = Image.fromarray(img.mul(255).round().clamp(0, 255).to(torch.uint8).numpy())
            resized = pil.resize((width, height), Image.LANCZOS)
            images.append(torch.from_numpy(np.array(resized)).float() / 255)
        return torch.stack(images).movedim(-1, 1)
    kwargs: dict[str, Any] = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(samples, size=(height, width), mode=method, **kwargs)


def _fit(width: int, height: int, old_w: int, old_h: int, minimum: int) -> tuple[int, int]:
    if width == 0:
        height = max(minimum, height)
        width = max(minimum, round(old_w * height / old_h))
    elif height == 0:
        width = max(minimum, width)
        height = max(minimum, round(old_h * width / old_w))
    else:
        width, height = max(minimum, width), max(minimum, height)
    return width, height


@node("LatentUpscale")
def latent_upscale(ctx: NodeContext, samples: dict, upscale_method: str, width: int, height: int,
                   crop: str = "disabled") -> NodeResult:
    if width == 0 and height == 0:
        return NodeResult((samples,))
    lat = samples["samples"]
    width, height = _fit(width, height, lat.shape[-1] * 8, lat.shape[-2] * 8, 64)
    return NodeResult(({**samples, "samples": common_upscale(lat, width // 8, height // 8, upscale_method, crop)},))


@node("LatentUpscaleBy")
def latent_upscale_by(ctx: NodeContext, samples: dict, upscale_method: str, scale_by: float) -> NodeResult:
    lat = samples["samples"]
    width, height = round(lat.shape[-1] * scale_by), round(lat.shape[-2] * scale_by)
    return NodeResult(({**samples, "samples": common_upscale(lat, width, height, upscale_method, "disabled")},))


@node("RepeatLatentBatch")
def repeat_latent_batch(ctx: NodeContext, samples: dict, amount: int) -> NodeResult:
    out = dict(samples)
    out["samples"] = samples["samples"].repeat((amount, 1, 1, 1))
    mask = samples.get("noise_mask")
    if mask is not None and mask.shape[0] > 1:
        out["noise_mask"] = mask.repeat((amount, 1, 1, 1))
    if "batch_index" in samples:
        index = samples["batch_index"]
        offset = max(index) - min(index) + 1
        out["batch_index"] = index + [x + i * offset for i in range(1, amount) for x in index]
    return NodeResult((out,))


@node("LatentFromBatch")
def latent_from_batch(ctx: NodeContext, samples: dict, batch_index: int, length: int) -> NodeResult:
    lat = samples["samples"]
    batch_index = min(lat.shape[0] - 1, batch_index)
    length = min(lat.shape[0] - batch_index, length)
    out = dict(samples)
    out["samples"] = lat[batch_index:batch_index + length].clone()
    mask = samples.get("noise_mask")
    if mask is not None:
        if mask.shape[0] == 1:
            out["noise_mask"] = mask.clone()
        else:
            if mask.shape[0] < lat.shape[0]:
                mask = mask.repeat(math.ceil(lat.shape[0] / mask.shape[0]), 1, 1, 1)[: lat.shape[0]]
            out["noise_mask"] = mask[batch_index:batch_index + length].clone()
    index = samples.get("batch_index")
    out["batch_index"] = (list(range(batch_index, batch_index + length)) if index is None
                          else index[batch_index:batch_index + length])
    return NodeResult((out,))


@node("SetLatentNoiseMask")
def set_latent_noise_mask(ctx: NodeContext, samples: dict, mask: torch.Tensor) -> NodeResult:
    return NodeResult(({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},))


def _crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = (pixels.shape[1] // multiple) * multiple, (pixels.shape[2] // multiple) * multiple
    if (h, w) == tuple(pixels.shape[1:3]):
        return pixels
    dy, dx = (pixels.shape[1] % multiple) // 2, (pixels.shape[2] % multiple) // 2
    return pixels[:, dy:dy + h, dx:dx + w, :]


@node("VAEEncode")
@torch.inference_mode()
def vae_encode(ctx: NodeContext, pixels: torch.Tensor, vae: VaeHandle) -> NodeResult:
    pixels = _crop_to_multiple(pixels[..., :3], vae.downscale)
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise NodeError(f"the image is smaller than {vae.downscale} pixels")
    return NodeResult(({"samples": vae.encode(pixels)},))


def _tile_passes(tile: int) -> tuple[tuple[int, int], ...]:
    """ComfyUI's three tilings (square, tall, wide), averaged so that no seam sits in the same place twice."""
    return (tile, tile), (tile * 2, max(1, tile // 2)), (max(1, tile // 2), tile * 2)


def tiled_vae(samples: torch.Tensor, function: Any, tile: int, overlap: int, scale: float, out_channels: int,
              ctx: NodeContext) -> torch.Tensor:
    from tui_diffusion.pipeline.upscale import tiled_scale

    out = [tiled_scale(samples, function, t, overlap, scale, out_channels, on_tile=ctx.check_interrupt)
           for t in _tile_passes(tile)]
    return (out[0] + out[1] + out[2]) / 3


@node("VAEEncodeTiled")
@torch.inference_mode()
def vae_encode_tiled(ctx: NodeContext, pixels: torch.Tensor, vae: VaeHandle, tile_size: int = 512,
                     overlap: int = 64, temporal_size: int = 64, temporal_overlap: int = 8) -> NodeResult:
    """VAEEncode in tiles of ``tile_size`` pixels (the temporal inputs are for video VAEs, which are not here).
    An overlap over a quarter of the tile is cut to that quarter, as VAEDecodeTiled does (the half-size tiles of
    the second and third tilings would otherwise not advance)."""
    overlap = min(overlap, tile_size // 4)
    pixels = _crop_to_multiple(pixels[..., :3], vae.downscale)
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise NodeError(f"the image is smaller than {vae.downscale} pixels")
    x = pixels.movedim(-1, 1)
    latent = tiled_vae(x, lambda t: vae.encode(t.movedim(1, -1)), tile_size, overlap, 1 / vae.downscale,
                       vae.latent_channels, ctx)
    return NodeResult(({"samples": latent},))


@node("VAEEncodeForInpaint")
@torch.inference_mode()
def vae_encode_for_inpaint(ctx: NodeContext, pixels: torch.Tensor, vae: VaeHandle, mask: torch.Tensor,
                           grow_mask_by: int = 6) -> NodeResult:
    d = vae.downscale
    h, w = (pixels.shape[1] // d) * d, (pixels.shape[2] // d) * d
    mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
                         size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
    pixels = _crop_to_multiple(pixels[..., :3].clone(), d)
    dy, dx = (mask.shape[2] % d) // 2, (mask.shape[3] % d) // 2
    mask = mask[:, :, dy:dy + h, dx:dx + w]
    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)), 0, 1)
    keep = (1.0 - mask.round()).squeeze(1)
    pixels = (pixels - 0.5) * keep[..., None] + 0.5
    return NodeResult(({"samples": vae.encode(pixels), "noise_mask": grown[:, :, :h, :w].round()},))


@node("VAELoader")
def vae_loader(ctx: NodeContext, vae_name: str) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("vae", vae_name)
    loaded = eng.models.get(key, lambda: load_vae(path, eng.device, eng.config_cache, eng.allow_pickle))
    return NodeResult((loaded,))


@node("ConditioningCombine")
def conditioning_combine(ctx: NodeContext, conditioning_1: list, conditioning_2: list) -> NodeResult:
    return NodeResult((conditioning_1 + conditioning_2,))


@node("ConditioningSetTimestepRange")
def conditioning_set_timestep_range(ctx: NodeContext, conditioning: list, start: float = 0.0,
                                    end: float = 1.0) -> NodeResult:
    return NodeResult(([[emb, {**extras, "timestep_start": start, "timestep_end": end}]
                        for emb, extras in conditioning],))


@node("VAEDecodeTiled")
@torch.inference_mode()
def vae_decode_tiled(ctx: NodeContext, samples: dict, vae: VaeHandle, tile_size: int = 512, overlap: int = 64,
                     temporal_size: int = 64, temporal_overlap: int = 8) -> NodeResult:
    """VAEDecode in tiles of ``tile_size`` pixels; as in ComfyUI an overlap over a quarter of the tile is cut to
    that quarter (the temporal inputs are for video VAEs, which are not here)."""
    z = samples["samples"]
    if z.shape[1] != vae.latent_channels:
        raise NodeError(f"the latent has {z.shape[1]} channels but this VAE takes {vae.latent_channels}: use the "
                        "VAE of the model family that made it")
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    scale = vae.downscale
    images = tiled_vae(z, vae.decode, tile_size // scale, overlap // scale, scale, 3, ctx)
    return NodeResult(((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous(),))

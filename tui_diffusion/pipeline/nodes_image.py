"""Image nodes: loading from the input folder, masks, resizing (ComfyUI's semantics)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tui_diffusion.paths import PathError
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.nodes_latent import _fit, common_upscale
from tui_diffusion.pipeline.registry import NodeResult, node


def _open(ctx: NodeContext, name: str) -> Image.Image:
    try:
        path = ctx.engine.paths.resolve("input", name)
        img = Image.open(path)
        img.load()
    except PathError as exc:
        raise NodeError(str(exc)) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise NodeError(f"{name}: not a readable image ({exc})") from None
    return ImageOps.exif_transpose(img)


@node("LoadImage")
def load_image(ctx: NodeContext, image: str) -> NodeResult:
    img = _open(ctx, image)
    rgb = torch.from_numpy(np.asarray(img.convert("RGB")).astype(np.float32) / 255.0)[None]
    if "A" in img.getbands():
        mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A")).astype(np.float32) / 255.0)
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return NodeResult((rgb, mask[None]))


@node("LoadImageMask")
def load_image_mask(ctx: NodeContext, image: str, channel: str = "alpha") -> NodeResult:
    img = _open(ctx, image)
    band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[channel]
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA")
    if img.mode in ("L", "LA") and band in "RGB":
        img = img.convert("RGBA")
    if band not in img.getbands():
        return NodeResult((torch.zeros((1, 64, 64), dtype=torch.float32),))
    mask = torch.from_numpy(np.asarray(img.getchannel(band)).astype(np.float32) / 255.0)
    if band == "A":
        mask = 1.0 - mask
    return NodeResult((mask[None],))


@node("ImageScale")
def image_scale(ctx: NodeContext, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str = "disabled") -> NodeResult:
    if width == 0 and height == 0:
        return NodeResult((image,))
    width, height = _fit(width, height, image.shape[2], image.shape[1], 1)
    out = common_upscale(image.movedim(-1, 1), width, height, upscale_method, crop).movedim(1, -1)
    return NodeResult((out.clamp(0, 1),))


@node("ImageScaleBy")
def image_scale_by(ctx: NodeContext, image: torch.Tensor, upscale_method: str, scale_by: float) -> NodeResult:
    width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
    out = common_upscale(image.movedim(-1, 1), width, height, upscale_method, "disabled").movedim(1, -1)
    return NodeResult((out.clamp(0, 1),))

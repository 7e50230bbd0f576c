"""Mask nodes (ComfyUI's ``nodes_mask``): making, combining, growing and converting masks.

MASK is a float tensor ``[B, H, W]`` in 0..1 (a single ``[H, W]`` is accepted wherever ComfyUI accepts it);
IMAGE is ``[B, H, W, C]``. The pasting helper here is shared by ImageCompositeMasked and LatentCompositeMasked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.registry import NodeResult, node

CHANNELS = ("red", "green", "blue", "alpha")


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """A mask as ``[B, H, W]`` (ComfyUI's masks come as ``[H, W]`` too)."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def repeat_to_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """The batch cut or cycled to ``size`` items, as ComfyUI's ``repeat_to_batch_size``."""
    if tensor.shape[0] > size:
        return tensor[:size]
    if tensor.shape[0] < size:
        reps = -(-size // tensor.shape[0])
        return tensor.repeat((reps,) + (1,) * (tensor.ndim - 1))[:size]
    return tensor


def paste(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
          multiplier: int, resize_source: bool) -> torch.Tensor:
    """Source pasted onto destination (both ``[B, C, H, W]``, destination modified in place and returned).

    ``x``/``y`` are in pixels; ``multiplier`` is the pixels per element (8 for latents, 1 for images). A part of
    the source outside the destination is dropped; the mask (any size) is stretched over the source.
    """
    source = source.to(destination.device)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[-1] * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-source.shape[-2] * multiplier, min(y, destination.shape[-2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[-1], top + source.shape[-2]
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = as_batch(mask.to(destination.device, torch.float32))[:, None]
        weight = F.interpolate(weight, size=source.shape[-2:], mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    visible_w = destination.shape[-1] - left + min(0, x)
    visible_h = destination.shape[-2] - top + min(0, y)
    weight = weight[:, :, :visible_h, :visible_w]
    part = destination[..., top:bottom, left:right]
    destination[..., top:bottom, left:right] = weight * source[..., :visible_h, :visible_w] + (1 - weight) * part
    return destination


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    return as_batch(mask)[..., None].expand(-1, -1, -1, 3)


@node("SolidMask")
def solid_mask(ctx: NodeContext, value: float, width: int, height: int) -> NodeResult:
    return NodeResult((torch.full((1, height, width), value, dtype=torch.float32),))


@node("InvertMask")
def invert_mask(ctx: NodeContext, mask: torch.Tensor) -> NodeResult:
    return NodeResult((1.0 - mask,))


@node("MaskComposite")
def mask_composite(ctx: NodeContext, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                   operation: str) -> NodeResult:
    """The overlapping part of destination combined with source; and/or/xor on masks rounded to 0/1."""
    out = as_batch(destination).clone()
    source = as_batch(source).to(out.device)
    right, bottom = min(x + source.shape[-1], out.shape[-1]), min(y + source.shape[-2], out.shape[-2])
    src = source[:, :max(0, bottom - y), :max(0, right - x)]
    dst = out[:, y:bottom, x:right]
    if dst.numel() == 0:
        return NodeResult((out.clamp(0.0, 1.0),))
    if operation == "multiply":
        combined = dst * src
    elif operation == "add":
        combined = dst + src
    elif operation == "subtract":
        combined = dst - src
    elif operation in ("and", "or", "xor"):
        op = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
        combined = op(dst.round().bool(), src.round().bool()).float()
    else:
        raise NodeError(f"unknown operation {operation!r}")
    out[:, y:bottom, x:right] = combined
    return NodeResult((out.clamp(0.0, 1.0),))


@node("FeatherMask")
def feather_mask(ctx: NodeContext, mask: torch.Tensor, left: int, top: int, right: int,
                 bottom: int) -> NodeResult:
    """Linear ramps from each chosen edge, as ComfyUI computes them.

    ComfyUI indexes the right and bottom ramps from the end with ``-i`` for i = 0..n-1, so their first factor
    (1/n) lands on the first column/row and the edge itself gets 2/n; workflows made there expect that, so it is
    kept.
    """
    out = as_batch(mask).clone()
    left, right = min(left, out.shape[-1]), min(right, out.shape[-1])
    top, bottom = min(top, out.shape[-2]), min(bottom, out.shape[-2])
    for i in range(left):
        out[:, :, i] *= (i + 1.0) / left
    for i in range(right):
        out[:, :, -i] *= (i + 1.0) / right
    for i in range(top):
        out[:, i, :] *= (i + 1.0) / top
    for i in range(bottom):
        out[:, -i, :] *= (i + 1.0) / bottom
    return NodeResult((out,))


def _grow_once(mask: torch.Tensor, grow: bool, tapered: bool) -> torch.Tensor:
    """One step of grey dilation (or erosion) over a 3x3 cross (tapered) or square, edges extended."""
    sign = 1.0 if grow else -1.0
    padded = F.pad(sign * mask[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    h, w = mask.shape[-2:]
    offsets = [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)]
    if not tapered:
        offsets += [(0, 0), (0, 2), (2, 0), (2, 2)]
    shifted = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy, dx in offsets])
    return sign * shifted.amax(dim=0)


@node("GrowMask")
def grow_mask(ctx: NodeContext, mask: torch.Tensor, expand: int, tapered_corners: bool = True) -> NodeResult:
    """``|expand|`` steps of grey dilation (expand > 0) or erosion (< 0), as scipy's with ComfyUI's footprint."""
    out = as_batch(mask).float()
    for step in range(abs(expand)):
        if step % 64 == 0:
            ctx.check_interrupt()
        out = _grow_once(out, expand > 0, tapered_corners)
    return NodeResult((out,))


@node("ThresholdMask")
def threshold_mask(ctx: NodeContext, mask: torch.Tensor, value: float = 0.5) -> NodeResult:
    return NodeResult(((mask > value).float(),))


@node("CropMask")
def crop_mask(ctx: NodeContext, mask: torch.Tensor, x: int, y: int, width: int, height: int) -> NodeResult:
    out = as_batch(mask)[:, y:y + height, x:x + width]
    if out.shape[-1] == 0 or out.shape[-2] == 0:
        raise NodeError(f"x={x}, y={y} is outside the {mask.shape[-1]}x{mask.shape[-2]} mask")
    return NodeResult((out,))


@node("ImageToMask")
def image_to_mask(ctx: NodeContext, image: torch.Tensor, channel: str = "red") -> NodeResult:
    index = CHANNELS.index(channel)
    if index >= image.shape[-1]:
        raise NodeError(f"the image has no {channel} channel (it has {image.shape[-1]} channels)")
    return NodeResult((image[..., index],))


@node("MaskToImage")
def mask_to_image_node(ctx: NodeContext, mask: torch.Tensor) -> NodeResult:
    return NodeResult((mask_to_image(mask),))


@node("ImageColorToMask")
def image_color_to_mask(ctx: NodeContext, image: torch.Tensor, color: int = 0) -> NodeResult:
    """1 where the pixel's 8-bit RGB value, packed as 0xRRGGBB, equals ``color``."""
    levels = (image[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
    packed = (levels[..., 0] << 16) + (levels[..., 1] << 8) + levels[..., 2]
    return NodeResult(((packed == color).float(),))


@node("MaskPreview")
def mask_preview(ctx: NodeContext, mask: torch.Tensor) -> NodeResult:
    from tui_diffusion.pipeline.nodes import preview_image

    return preview_image(ctx, mask_to_image(mask).clamp(0, 1))

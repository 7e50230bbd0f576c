"""Image nodes beyond loading and resizing: padding, cropping, filters, batches, stitching, pasting, Canny.

Each follows ComfyUI's node of the same name (``nodes.py``, ``comfy_extras/nodes_images.py``,
``nodes_post_processing.py``, ``nodes_mask.py``, ``nodes_canny.py``). IMAGE is ``[B, H, W, C]`` in 0..1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.nodes_latent import common_upscale
from tui_diffusion.pipeline.nodes_masks import paste
from tui_diffusion.pipeline.registry import NodeResult, node


def _channels_first(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(-1, 1)


def _channels_last(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1)


@node("ImageScaleToTotalPixels")
def image_scale_to_total_pixels(ctx: NodeContext, image: torch.Tensor, upscale_method: str, megapixels: float,
                                resolution_steps: int = 1) -> NodeResult:
    """Scaled so that width x height is about ``megapixels`` x 1024 x 1024, sides rounded to the step."""
    height, width = image.shape[1], image.shape[2]
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    new_w = round(width * scale / resolution_steps) * resolution_steps
    new_h = round(height * scale / resolution_steps) * resolution_steps
    if new_w < 1 or new_h < 1:
        raise NodeError(f"{megapixels} megapixels in steps of {resolution_steps} leaves no pixel of this "
                        f"{width}x{height} image")
    out = common_upscale(_channels_first(image), new_w, new_h, upscale_method, "disabled")
    return NodeResult((_channels_last(out),))


@node("ImagePadForOutpaint")
def image_pad_for_outpaint(ctx: NodeContext, image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                           feathering: int = 40) -> NodeResult:
    """Grey (0.5) borders and a mask: 1 on the borders, inside the image (d / feathering)^2 ramps near the
    padded sides (d: pixels to the nearest padded side), when the image is over twice the feathering."""
    batch, height, width, channels = image.shape
    out = torch.full((batch, height + top + bottom, width + left + right, channels), 0.5, dtype=torch.float32)
    out[:, top:top + height, left:left + width, :] = image
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inner = torch.zeros((height, width), dtype=torch.float32)
    if 0 < feathering and feathering * 2 < height and feathering * 2 < width:
        rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        far_h, far_w = torch.full_like(rows, height), torch.full_like(cols, width)
        distance = torch.stack([
            rows if top else far_h, height - rows if bottom else far_h,
            cols if left else far_w, width - cols if right else far_w,
        ]).amin(dim=0)
        ramp = ((feathering - distance) / feathering) ** 2
        inner = torch.where(distance < feathering, ramp, inner)
    mask[top:top + height, left:left + width] = inner
    return NodeResult((out, mask[None]))


@node("ImageCrop")
def image_crop(ctx: NodeContext, image: torch.Tensor, width: int, height: int, x: int = 0, y: int = 0) -> NodeResult:
    x = min(x, image.shape[2] - 1)
    y = min(y, image.shape[1] - 1)
    return NodeResult((image[:, y:y + height, x:x + width, :],))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's 2-D Gaussian: coordinates spread over -1..1 across the kernel (sigma is relative to the
    radius, not in pixels), normalised to sum 1."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    g = torch.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-channel 2-D convolution with the edges mirrored (reflect padding)."""
    channels = image.shape[-1]
    weight = kernel.to(image.dtype).expand(channels, 1, *kernel.shape).contiguous()
    padded = F.pad(_channels_first(image), (radius, radius, radius, radius), mode="reflect")
    return _channels_last(F.conv2d(padded, weight, groups=channels))


def _check_radius(image: torch.Tensor, radius: int) -> None:
    if radius >= min(image.shape[1], image.shape[2]):
        raise NodeError(f"a radius of {radius} needs an image larger than {image.shape[2]}x{image.shape[1]}")


@node("ImageBlur")
def image_blur(ctx: NodeContext, image: torch.Tensor, blur_radius: int = 1, sigma: float = 1.0) -> NodeResult:
    if blur_radius == 0:
        return NodeResult((image,))
    _check_radius(image, blur_radius)
    return NodeResult((_filter(image, gaussian_kernel(blur_radius * 2 + 1, sigma), blur_radius),))


@node("ImageSharpen")
def image_sharpen(ctx: NodeContext, image: torch.Tensor, sharpen_radius: int = 1, sigma: float = 1.0,
                  alpha: float = 1.0) -> NodeResult:
    """The kernel is -10 alpha times the Gaussian, with its centre raised so that it sums to 1."""
    if sharpen_radius == 0:
        return NodeResult((image,))
    _check_radius(image, sharpen_radius)
    size = sharpen_radius * 2 + 1
    kernel = gaussian_kernel(size, sigma) * -(alpha * 10)
    kernel[size // 2, size // 2] += 1.0 - kernel.sum()
    return NodeResult((_filter(image, kernel, sharpen_radius).clamp(0, 1),))


def _match_channels(image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image beside an RGBA one gets an opaque alpha channel."""
    if image1.shape[-1] < image2.shape[-1]:
        image1 = F.pad(image1, (0, image2.shape[-1] - image1.shape[-1]), value=1.0)
    elif image2.shape[-1] < image1.shape[-1]:
        image2 = F.pad(image2, (0, image1.shape[-1] - image2.shape[-1]), value=1.0)
    return image1, image2


@node("ImageBatch")
def image_batch(ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor) -> NodeResult:
    image1, image2 = _match_channels(image1, image2)
    if image1.shape[1:] != image2.shape[1:]:
        image2 = _channels_last(common_upscale(_channels_first(image2), image1.shape[2], image1.shape[1],
                                               "bilinear", "center"))
    return NodeResult((torch.cat((image1, image2.to(image1.dtype)), dim=0),))


_SPACING_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _pad_centered(image: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    """``image`` padded along ``dim`` (1: height, 2: width) to ``size``, centred."""
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    pad = (0, 0, before, after) if dim == 2 else (0, 0, 0, 0, before, after)
    return F.pad(image, pad, value=value)


@node("ImageStitch")
def image_stitch(ctx: NodeContext, image1: torch.Tensor, direction: str = "right", match_image_size: bool = True,
                 spacing_width: int = 0, spacing_color: str = "white",
                 image2: torch.Tensor | None = None) -> NodeResult:
    """image2 beside image1; the shorter batch repeats its last image, and image2 is scaled (Lanczos) to
    image1's height (left/right) or width (up/down), or without matching both are padded to centre them."""
    if image2 is None:
        return NodeResult((image1,))
    size = max(image1.shape[0], image2.shape[0])
    if image1.shape[0] < size:
        image1 = torch.cat([image1, image1[-1:].repeat(size - image1.shape[0], 1, 1, 1)])
    if image2.shape[0] < size:
        image2 = torch.cat([image2, image2[-1:].repeat(size - image2.shape[0], 1, 1, 1)])
    sideways = direction in ("left", "right")
    if match_image_size:
        h1, w1 = image1.shape[1:3]
        aspect = image2.shape[2] / image2.shape[1]
        target_w, target_h = (int(h1 * aspect), h1) if sideways else (w1, int(w1 / aspect))
        if target_w < 1 or target_h < 1:
            raise NodeError(f"image2 scaled to match image1 would be {target_w}x{target_h} pixels")
        image2 = _channels_last(common_upscale(_channels_first(image2), target_w, target_h, "lanczos", "disabled"))
    else:
        pad_value = 1.0 if spacing_color == "white" else 0.0
        dim = 1 if sideways else 2
        size_along = max(image1.shape[dim], image2.shape[dim])
        image1 = _pad_centered(image1, dim, size_along, pad_value)
        image2 = _pad_centered(image2, dim, size_along, pad_value)
    image1, image2 = _match_channels(image1, image2.to(image1.dtype))
    parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
    if spacing_width > 0:
        spacing_width += spacing_width % 2
        channels = image1.shape[-1]
        if sideways:
            shape = (image1.shape[0], max(image1.shape[1], image2.shape[1]), spacing_width, channels)
        else:
            shape = (image1.shape[0], spacing_width, max(image1.shape[2], image2.shape[2]), channels)
        spacing = torch.zeros(shape, dtype=image1.dtype)
        for i, value in enumerate(_SPACING_COLORS[spacing_color][:channels]):
            spacing[..., i] = value
        if channels == 4:
            spacing[..., 3] = 1.0
        parts.insert(1, spacing)
    try:
        return NodeResult((torch.cat(parts, dim=2 if sideways else 1),))
    except RuntimeError:
        raise NodeError(f"cannot put a {tuple(image2.shape[1:3])} image {direction} of a "
                        f"{tuple(image1.shape[1:3])} one") from None


@node("ImageCompositeMasked")
def image_composite_masked(ctx: NodeContext, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                           resize_source: bool = False, mask: torch.Tensor | None = None) -> NodeResult:
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        destination = F.pad(destination, (0, 1), value=1.0)
    out = paste(_channels_first(destination).clone(), _channels_first(source), x, y, mask, 1, resize_source)
    return NodeResult((_channels_last(out),))


@node("EmptyImage")
def empty_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1, color: int = 0) -> NodeResult:
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 0xFF
    return NodeResult((rgb.expand(batch_size, height, width, 3).clone(),))


@node("ImageInvert")
def image_invert(ctx: NodeContext, image: torch.Tensor) -> NodeResult:
    return NodeResult((1.0 - image,))


# -- Canny --------------------------------------------------------------------------------------------------
_GRAY = (0.299, 0.587, 0.114)
#: neighbour (row, column) offsets for gradient directions 0, 45, ..., 315 degrees (rows grow downwards)
_NEIGHBOURS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _gaussian_blur(gray: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian of ``size`` pixels (sigma in pixels), edges mirrored."""
    x = torch.arange(size, dtype=gray.dtype, device=gray.device) - size // 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    r = size // 2
    out = F.conv2d(F.pad(gray, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, size))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), g.view(1, 1, size, 1))


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t`` read at (row + dy, column + dx), zero outside."""
    h, w = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def canny(image: torch.Tensor, low: float, high: float, check: Callable[[], None] = lambda: None) -> torch.Tensor:
    """Canny edges of ``[B, C, H, W]`` images in 0..1: ``[B, 1, H, W]`` with 1 on edges, 0 elsewhere.

    The grey image (Rec. 601 weights) is blurred (5x5, sigma 1), its Sobel gradient taken (edges replicated);
    a pixel stays when its magnitude is no smaller than both neighbours along the gradient direction (rounded
    to 45 degrees); magnitudes above ``high`` are edges, those above ``low`` become edges when connected to
    one through 8-neighbours (hysteresis). The steps and parameters are those of kornia's ``canny``, which
    ComfyUI's node calls with its defaults.
    """
    if image.shape[1] == 3:
        weights = torch.tensor(_GRAY, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        gray = (image * weights).sum(dim=1, keepdim=True)
    elif image.shape[1] == 4:
        weights = torch.tensor(_GRAY, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        gray = (image[:, :3] * weights).sum(dim=1, keepdim=True)
    else:
        gray = image[:, :1]
    blurred = _gaussian_blur(gray)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype,
                           device=image.device)
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
    grad = F.conv2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), kernels)
    gx, gy = grad[:, :1], grad[:, 1:]
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)
    direction = torch.round(torch.atan2(gy, gx) * (180.0 / math.pi) / 45.0)
    forward = torch.remainder(direction, 8).long()
    backward = torch.remainder(direction + 4, 8).long()
    differences = torch.cat([magnitude - _shift(magnitude, dy, dx) for dy, dx in _NEIGHBOURS], dim=1)
    is_max = torch.minimum(differences.gather(1, forward), differences.gather(1, backward)) > 0
    magnitude = magnitude * is_max
    strong = magnitude > high
    weak = (magnitude > low) & ~strong
    edges = strong
    while True:
        check()
        near = torch.zeros_like(edges)
        for dy, dx in _NEIGHBOURS:
            near |= _shift(edges, dy, dx)
        grown = edges | (weak & near)
        if torch.equal(grown, edges):
            return edges.to(image.dtype)
        edges = grown


@node("Canny")
@torch.inference_mode()
def canny_node(ctx: NodeContext, image: torch.Tensor, low_threshold: float = 0.4, high_threshold: float = 0.8,
               device: str = "cpu") -> NodeResult:
    where = ctx.engine.device.torch_device if device == "gpu" else torch.device("cpu")
    edges = canny(_channels_first(image).to(where, torch.float32), low_threshold, high_threshold,
                  ctx.check_interrupt)
    return NodeResult((_channels_last(edges.cpu().repeat(1, 3, 1, 1)),))

"""Upscale models (ESRGAN, Real-ESRGAN, SwinIR, ...) through spandrel, tiled as ComfyUI tiles them.

spandrel, the library ComfyUI uses, detects the architecture from the state dict's keys and shapes. Files are
read here, under the project's rules: ``.safetensors`` directly, pickles (``.pth``, ``.pt``, ...) only with
``--allow-pickle`` and then through ``torch.load(weights_only=True)``. ImageUpscaleWithModel runs the model on
512-pixel tiles overlapping by 32 pixels, blended with linear ramps over the overlap, and halves the tile after
running out of memory (down to 128), as ComfyUI's node does.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.paths import PICKLE_SUFFIXES
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.registry import NodeResult, node

log = logging.getLogger(__name__)

TILE = 512
OVERLAP = 32
MIN_TILE = 128


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The names two of spandrel's architectures (LaMa, RestoreFormer) import from torchvision when spandrel is
    imported. Used only where torchvision is missing or cannot load (PyPI's torchvision is built against CUDA
    torch, and fails to import beside the CPU wheel); no upscale architecture calls them."""
    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def rotate(*args: Any, **kwargs: Any) -> Any:
        raise NodeError("this model (LaMa, an inpainting model) needs torchvision, which cannot be imported here")

    def normalize(tensor: torch.Tensor, mean: list[float], std: list[float], inplace: bool = False) -> torch.Tensor:
        m = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return (tensor - m) / s

    functional.InterpolationMode, functional.rotate, functional.normalize = InterpolationMode, rotate, normalize
    transforms.functional, root.transforms = functional, transforms
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


@functools.cache
def spandrel_module() -> Any:
    """spandrel, imported with a stand-in for torchvision where torchvision itself does not import."""
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # missing, or built for another torch (RuntimeError, OSError, ImportError)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stand_in = _torchvision_stand_in()
        sys.modules.update(stand_in)
        log.info("torchvision does not import: spandrel loads with a stand-in for it")
        try:
            return _import_spandrel()
        finally:
            for name in stand_in:  # others (transformers) look for the real one
                sys.modules.pop(name, None)
    return _import_spandrel()


def _import_spandrel() -> Any:
    try:
        import spandrel
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "spandrel":
            raise NodeError("upscale models need the spandrel package: pip install spandrel (or install "
                            "tui-diffusion[upscale])") from None
        raise NodeError(f"spandrel cannot be imported: {exc}") from None
    return spandrel


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint, as ComfyUI reads it: under "state_dict", or the single
    entry of a one-key dict ({"params_ema": {...}})."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and len(obj) == 1:
        (inner,) = obj.values()
        if isinstance(inner, dict):
            return inner
    return obj


def read_state_dict(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """The tensors of an upscale model file; NodeError names the file and says why when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise NodeError(f"{path}: pickle files ({suffix}) can run arbitrary code when loaded and are refused; "
                            "use the .safetensors version of the model, or allow them with --allow-pickle "
                            "(loaded with torch.load(weights_only=True))")
        from tui_diffusion.pipeline.models import load_weights_only

        obj = load_weights_only(path, NodeError)
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise NodeError(f"{path}: cannot read it as safetensors: {exc}") from None
    state = _unwrap(obj)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise NodeError(f"{path}: holds no named tensors (not a model's weights)")
    return state


def load_upscale_model(path: Path, allow_pickle: bool = False) -> Any:
    """A spandrel ImageModelDescriptor (on the CPU, in eval mode) for a single-image model file."""
    spandrel = spandrel_module()
    state = read_state_dict(path, allow_pickle)
    if "module.layers.0.residual_group.blocks.0.norm1.weight" in state:  # SwinIR saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state).eval()
    except spandrel.UnsupportedModelError:
        raise NodeError(f"{path.name}: not an upscale model architecture spandrel knows (ESRGAN, Real-ESRGAN, "
                        "SwinIR, HAT, DAT, SPAN, Compact, ...)") from None
    except (KeyError, ValueError, RuntimeError) as exc:
        raise NodeError(f"{path.name}: its weights do not fit the architecture they look like: {exc}") from None
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise NodeError(f"{path.name}: a {model.architecture.name} model is not a single-image model (an "
                        "inpainting or face model); ImageUpscaleWithModel needs an upscale model")
    return model


def tiled_scale(samples: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], tile: int | tuple[int, int],
                overlap: int, scale: float, out_channels: int,
                on_tile: Callable[[], None] = lambda: None) -> torch.Tensor:
    """``function`` applied to overlapping tiles of ``samples`` ``[B, C, H, W]``, the results (``scale`` times
    larger, or smaller) averaged where they overlap with weights ramping linearly over the scaled overlap.

    The grid is ComfyUI's: tiles (``tile`` square, or ``(height, width)``) start every ``tile - overlap`` pixels
    (the last one clipped by the image), an image that fits in one tile runs whole. The result is float32 on the
    CPU.
    """
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    batch, _, height, width = samples.shape
    out_h, out_w = round(height * scale), round(width * scale)
    output = torch.empty((batch, out_channels, out_h, out_w), dtype=torch.float32)
    feather = round(overlap * scale)
    for b in range(batch):
        image = samples[b:b + 1]
        if height <= tile_h and width <= tile_w:
            output[b:b + 1] = function(image).float().cpu()
            on_tile()
            continue
        total = torch.zeros((1, out_channels, out_h, out_w), dtype=torch.float32)
        weights = torch.zeros_like(total)
        rows = range(0, height - overlap, tile_h - overlap) if height > tile_h else [0]
        cols = range(0, width - overlap, tile_w - overlap) if width > tile_w else [0]
        for row in rows:
            for col in cols:
                y, x = max(0, min(height - overlap, row)), max(0, min(width - overlap, col))
                piece = function(image[:, :, y:y + tile_h, x:x + tile_w]).float().cpu()
                ramp = torch.ones_like(piece)
                for dim in (2, 3):
                    if feather >= ramp.shape[dim]:
                        continue
                    for t in range(feather):
                        factor = (t + 1) / feather
                        ramp.narrow(dim, t, 1).mul_(factor)
                        ramp.narrow(dim, ramp.shape[dim] - 1 - t, 1).mul_(factor)
                oy, ox = round(y * scale), round(x * scale)
                total[:, :, oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += piece * ramp
                weights[:, :, oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += ramp
                on_tile()
        output[b:b + 1] = total / weights
    return output


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    """How many tiles ``tiled_scale`` runs for one image."""
    rows = 1 if height <= tile else len(range(0, height - overlap, tile - overlap))
    cols = 1 if width <= tile else len(range(0, width - overlap, tile - overlap))
    return rows * cols


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _tick(counter: Iterator[int], total: int, progress: Callable[[int, int], None]) -> None:
    progress(next(counter), total)


@torch.inference_mode()
def upscale_image(model: Any, image: torch.Tensor, device: torch.device, tile: int = TILE, overlap: int = OVERLAP,
                  progress: Callable[[int, int], None] = lambda step, total: None) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` upscaled by the model in tiles, clamped to 0..1; the tile halves on running out of
    memory until it would fall under 128 pixels, when the error stands."""
    pixels = image.movedim(-1, 1).float()
    model.to(device)
    try:
        while True:
            total = pixels.shape[0] * tile_count(pixels.shape[2], pixels.shape[3], tile, overlap)
            step = functools.partial(_tick, itertools.count(1), total, progress)
            try:
                out = tiled_scale(pixels, lambda t: model(t.to(device)), tile, overlap, model.scale,
                                  model.output_channels, step)
                break
            except Exception as exc:
                if not _is_oom(exc) or tile // 2 < MIN_TILE:
                    raise
                tile //= 2
                log.info("out of memory: upscaling again in %d-pixel tiles", tile)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        model.to("cpu")
    return out.movedim(1, -1).clamp(0.0, 1.0)


@node("UpscaleModelLoader")
def upscale_model_loader(ctx: NodeContext, model_name: str) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("upscale_models", model_name)
    return NodeResult((eng.upscale_models.get(key, lambda: load_upscale_model(path, eng.allow_pickle)),))


@node("ImageUpscaleWithModel")
def image_upscale_with_model(ctx: NodeContext, upscale_model: Any, image: torch.Tensor) -> NodeResult:
    if image.shape[-1] != upscale_model.input_channels:
        raise NodeError(f"this {upscale_model.architecture.name} model takes {upscale_model.input_channels}-channel "
                        f"images; the image has {image.shape[-1]} channels")

    def progress(step: int, total: int) -> None:  # after each tile: stop before the next one
        ctx.report(step, total, None)
        ctx.check_interrupt()

    return NodeResult((upscale_image(upscale_model, image, ctx.engine.device.torch_device, progress=progress),))

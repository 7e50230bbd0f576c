"""Latent transforms and files: composite, blend, crop, flip, rotate, SaveLatent and LoadLatent.

As ComfyUI's nodes of the same names: positions and sizes are in pixels (8 per latent element); other keys of
the LATENT (noise_mask, batch_index) are carried along unchanged, as ComfyUI's ``samples.copy()`` does.
LATENT holds the VAE's unscaled latent, as ComfyUI's does, so ``.latent`` files move between the two as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.paths import PathError
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.nodes_latent import common_upscale
from tui_diffusion.pipeline.nodes_masks import paste
from tui_diffusion.pipeline.registry import NodeResult, node
from tui_diffusion.store.outputs import split_prefix

#: the key ComfyUI's SaveLatent writes; files without it hold SD1's scaled latent (times 0.18215)
VERSION_KEY = "latent_format_version_0"
LEGACY_SCALE = 0.18215


@node("LatentComposite")
def latent_composite(ctx: NodeContext, samples_to: dict, samples_from: dict, x: int, y: int,
                     feather: int = 0) -> NodeResult:
    """samples_from pasted at (x, y); with feather, a linear ramp over that many pixels on each side that does
    not touch the destination's border blends it in."""
    x, y, feather = x // 8, y // 8, feather // 8
    dest = samples_to["samples"].clone()
    src = samples_from["samples"][:, :, :dest.shape[2] - y, :dest.shape[3] - x]
    if src.shape[2] <= 0 or src.shape[3] <= 0:
        return NodeResult(({**samples_to, "samples": dest},))
    if src.shape[1] != dest.shape[1]:
        raise NodeError(f"the latents have {src.shape[1]} and {dest.shape[1]} channels (different model families)")
    region = dest[:, :, y:y + src.shape[2], x:x + src.shape[3]]
    if feather == 0:
        dest[:, :, y:y + src.shape[2], x:x + src.shape[3]] = src
    else:
        weight = torch.ones_like(src)
        h, w = src.shape[2], src.shape[3]
        for t in range(feather):  # slices as ComfyUI's, so a feather wider than the patch gives the same
            rate = (t + 1) / feather
            if y != 0:
                weight[:, :, t:t + 1, :] *= rate
            if y + h < dest.shape[2]:
                weight[:, :, h - 1 - t:h - t, :] *= rate
            if x != 0:
                weight[:, :, :, t:t + 1] *= rate
            if x + w < dest.shape[3]:
                weight[:, :, :, w - 1 - t:w - t] *= rate
        dest[:, :, y:y + h, x:x + w] = src * weight + region * (1 - weight)
    return NodeResult(({**samples_to, "samples": dest},))


@node("LatentCompositeMasked")
def latent_composite_masked(ctx: NodeContext, destination: dict, source: dict, x: int, y: int,
                            resize_source: bool = False, mask: torch.Tensor | None = None) -> NodeResult:
    dest = destination["samples"].clone()
    if source["samples"].shape[1] != dest.shape[1]:
        raise NodeError(f"the latents have {source['samples'].shape[1]} and {dest.shape[1]} channels "
                        "(different model families)")
    return NodeResult(({**destination, "samples": paste(dest, source["samples"], x, y, mask, 8, resize_source)},))


@node("LatentBlend")
def latent_blend(ctx: NodeContext, samples1: dict, samples2: dict, blend_factor: float = 0.5) -> NodeResult:
    """samples1 x factor + samples2 x (1 - factor); samples2 resized (bicubic, centre crop) when sizes differ."""
    a, b = samples1["samples"], samples2["samples"]
    if a.shape[1] != b.shape[1]:
        raise NodeError(f"the latents have {a.shape[1]} and {b.shape[1]} channels (different model families)")
    if a.shape != b.shape:
        b = common_upscale(b, a.shape[3], a.shape[2], "bicubic", "center")
    try:
        blended = a * blend_factor + b * (1 - blend_factor)
    except RuntimeError:
        raise NodeError(f"batches of {a.shape[0]} and {b.shape[0]} latents do not blend (one of them may be 1)") \
            from None
    return NodeResult(({**samples1, "samples": blended},))


@node("LatentCrop")
def latent_crop(ctx: NodeContext, samples: dict, width: int, height: int, x: int = 0, y: int = 0) -> NodeResult:
    """A window of width x height pixels at (x, y), its corner kept at least 64 pixels from the far edges."""
    lat = samples["samples"]
    x, y = min(x // 8, lat.shape[3] - 8), min(y // 8, lat.shape[2] - 8)
    x, y = max(x, 0), max(y, 0)
    return NodeResult(({**samples, "samples": lat[:, :, y:y + height // 8, x:x + width // 8]},))


@node("LatentFlip")
def latent_flip(ctx: NodeContext, samples: dict, flip_method: str) -> NodeResult:
    dim = 2 if flip_method.startswith("x") else 3
    return NodeResult(({**samples, "samples": torch.flip(samples["samples"], dims=[dim])},))


@node("LatentRotate")
def latent_rotate(ctx: NodeContext, samples: dict, rotation: str = "none") -> NodeResult:
    """Clockwise by 90, 180 or 270 degrees."""
    turns = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}[rotation]
    return NodeResult(({**samples, "samples": torch.rot90(samples["samples"], k=turns, dims=[3, 2])},))


def _next_counter(folder: Path, stem: str) -> int:
    prefix, suffix = f"{stem}_", "_.latent"
    found = [int(n[len(prefix):-len(suffix)]) for n in os.listdir(folder)
             if n.startswith(prefix) and n.endswith(suffix) and n[len(prefix):-len(suffix)].isdigit()]
    return max(found, default=0) + 1


def save_latent_file(tensors: dict[str, torch.Tensor], output_dir: Path, filename_prefix: str,
                     metadata: dict[str, str]) -> Path:
    """Write ``<prefix>_<counter:05>_.latent`` under the output folder, never over an existing file (written
    under a temporary name, then linked to the first free counter, as SaveImage's PNGs)."""
    from safetensors.torch import save_file

    folder, stem = split_prefix(output_dir, filename_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp.latent"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        counter = _next_counter(folder, stem)
        while True:
            final = folder / f"{stem}_{counter:05}_.latent"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                counter += 1
            except OSError:  # file systems without hard links
                if final.exists():
                    counter += 1
                    continue
                os.rename(tmp, final)
                return final
    finally:
        tmp.unlink(missing_ok=True)


@node("SaveLatent")
def save_latent(ctx: NodeContext, samples: dict, filename_prefix: str = "latents/ComfyUI") -> NodeResult:
    """ComfyUI's .latent: safetensors with ``latent_tensor`` and the version marker; the workflow in the
    metadata (``prompt``, and ``workflow`` in the UI format), as ComfyUI writes them."""
    from tui_diffusion.graph.ui_format import api_to_ui

    tensors = {"latent_tensor": samples["samples"].detach().float().cpu(), VERSION_KEY: torch.tensor([])}
    metadata = {"prompt": json.dumps(ctx.workflow), "workflow": json.dumps(api_to_ui(ctx.workflow))}
    try:
        path = save_latent_file(tensors, ctx.engine.output_dir, filename_prefix, metadata)
    except PathError as exc:
        raise NodeError(str(exc)) from None
    except OSError as exc:
        raise NodeError(f"cannot write the latent into {ctx.engine.output_dir}: {exc.strerror or exc}") from None
    return NodeResult((), [str(path)])


def read_latent_file(path: Path) -> dict[str, Any]:
    """The LATENT of a ComfyUI .latent file; NodeError names the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise NodeError(f"{path.name}: not a readable .latent (safetensors) file: {exc}") from None
    if "latent_tensor" not in tensors:
        raise NodeError(f"{path.name}: not a ComfyUI latent file (it has no 'latent_tensor'; it holds "
                        f"{', '.join(sorted(tensors)[:5]) or 'nothing'})")
    latent = tensors["latent_tensor"].float()
    if latent.ndim != 4:
        raise NodeError(f"{path.name}: the latent has shape {tuple(latent.shape)}, not [batch, channels, h, w]")
    scale = 1.0 if VERSION_KEY in tensors else 1.0 / LEGACY_SCALE
    return {"samples": latent * scale}


@node("LoadLatent")
def load_latent(ctx: NodeContext, latent: str) -> NodeResult:
    try:
        path = ctx.engine.paths.resolve("input_latents", latent)
    except PathError as exc:
        raise NodeError(str(exc)) from None
    return NodeResult((read_latent_file(path),))

"""Live previews while a sampler runs: a TAESD decoder when its file is there, latent-to-RGB otherwise.

ComfyUI reads the tiny autoencoders (TAESD) from ``models/vae_approx/``: ``taesd_decoder`` for SD1.x/SD2.x,
``taesdxl_decoder`` for SDXL, ``taesd3_decoder`` for SD3.x and ``taef1_decoder`` for Flux.1 (``.safetensors``
or ``.pth``; the family's latent format names its stem). A TAESD decoder takes the latent as the model sees it
(after the latent format's scale and shift), which is the ``denoised`` the sampler reports, and gives the
image in 0..1; we load it into diffusers' ``AutoencoderTiny`` after renaming its keys. ``--preview-method``
is ComfyUI's option: ``latent2rgb``, ``taesd``, ``none``, and ``auto``, which here means TAESD when the file
is present (the better picture) and latent-to-RGB otherwise (ComfyUI's ``auto`` always takes latent-to-RGB).

Previews are made lazily: the sampler hands the worker a callable, and the worker calls it only for the
previews it sends (at most one every 250 ms), so a TAESD decode never runs for a step nobody sees; and TAESD
decodes take at most a fifth of the time (``TaesdPreviewer.share``), which matters on a CPU, where one takes
longer than a step of a small model.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import PICKLE_SUFFIXES, ModelPaths
from tui_diffusion.settings import PREVIEW_METHODS

log = logging.getLogger(__name__)

__all__ = ["MAX_PREVIEW_SIDE", "PREVIEW_METHODS", "Latent2RGBPreviewer", "TaesdPreviewer", "choose_previewer",
           "find_taesd", "load_taesd_decoder", "taesd_to_diffusers"]

#: the longest side of a preview, in pixels (ComfyUI's default ``--preview-size``); a TAESD decode of a larger
#: latent runs on a latent shrunk to fit, so a big image does not cost a full-size decode per preview
MAX_PREVIEW_SIDE = 512

Previewer = Callable[[torch.Tensor], np.ndarray | None]


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """[H, W, 3] in -1..1 -> uint8, rounded (as ComfyUI's previews are)."""
    return ((rgb.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


class Latent2RGBPreviewer:
    """The family's linear latent -> RGB factors: free, blurry, latent-sized."""

    def __init__(self, latent_format: LatentFormat) -> None:
        self.factors = torch.tensor(latent_format.rgb_factors, dtype=torch.float32)
        self.bias = torch.tensor(latent_format.rgb_bias, dtype=torch.float32)

    def __call__(self, x0: torch.Tensor) -> np.ndarray:
        x = x0[0].float().cpu()
        return _to_uint8(torch.einsum("chw,cr->hwr", x, self.factors) + self.bias)


class TaesdPreviewer:
    """A TAESD decoder: a real-looking image at 8x the latent's size, for a few ms on a GPU.

    On a CPU one decode of a 512-pixel preview takes seconds, longer than the 250 ms between previews; so
    decodes may take at most ``share`` of the sampling's time: after a decode that took t seconds, calls
    within t * (1 / share - 1) seconds give None (the worker then sends no new picture)."""

    #: the most of the wall time that preview decodes may take
    share = 0.2

    def __init__(self, decoder: Any, max_side: int = MAX_PREVIEW_SIDE) -> None:
        self.decoder = decoder
        self.max_side = max_side
        param = next(decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._next = 0.0

    @torch.inference_mode()
    def __call__(self, x0: torch.Tensor) -> np.ndarray | None:
        start = time.perf_counter()
        if start < self._next:
            return None
        image = self._decode(x0)
        end = time.perf_counter()
        self._next = end + (end - start) * (1 / self.share - 1)
        return image

    def _decode(self, x0: torch.Tensor) -> np.ndarray:
        z = x0[:1].to(self.device, self.dtype)
        longest = max(z.shape[-2:]) * 8
        if longest > self.max_side:  # decode a smaller latent rather than shrink a big decode
            scale = self.max_side / longest
            size = (max(1, round(z.shape[-2] * scale)), max(1, round(z.shape[-1] * scale)))
            z = F.interpolate(z.float(), size=size, mode="area").to(self.dtype)
        image = self.decoder.decode(z, return_dict=False)[0]  # -1..1
        return _to_uint8(image[0].movedim(0, -1))


# -- TAESD files -----------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^(\d+)\.conv\.0\.weight$")
_CONV = re.compile(r"^(\d+)\.weight$")


def _decoder_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The decoder's own tensors, and whether they are numbered as diffusers numbers them. A decoder-only
    file has them bare (``1.weight``); a file holding encoder and decoder (``taesd_decoder.*``) or a diffusers
    ``AutoencoderTiny`` (``decoder.layers.*``) has them under a prefix."""
    for prefix, diffusers_layout in (("taesd_decoder.", False), ("decoder.layers.", True)):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            return inner, diffusers_layout
    return dict(state), False


def taesd_to_diffusers(state: dict[str, torch.Tensor],
                       diffusers_layout: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A TAESD decoder's tensors renamed for diffusers' ``DecoderTiny`` (``layers.N...``), and the
    ``AutoencoderTiny`` arguments that shape it.

    TAESD's decoder is one ``nn.Sequential`` whose item 0 is the input clamp (no weights), so item ``n`` is
    diffusers' ``layers[n - 1]`` (which applies the clamp in ``forward``); blocks keep their inner names.
    The layout (latent channels, blocks per stage, widths) is read from the tensors' shapes."""
    offset = 0 if diffusers_layout else 1
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not rest or int(index) < offset:
            raise CheckpointError(f"not a TAESD decoder: unexpected tensor {key!r}")
        renamed[f"layers.{int(index) - offset}.{rest}"] = value
    blocks = sorted(int(m.group(1)) for k in renamed if (m := _BLOCK.match(k.removeprefix("layers."))))
    convs = sorted(int(m.group(1)) for k in renamed if (m := _CONV.match(k.removeprefix("layers.")))
                   and renamed[k].ndim == 4)
    if len(convs) < 2 or not blocks:
        raise CheckpointError("not a TAESD decoder: no convolution/block layout found")
    first, last = renamed[f"layers.{convs[0]}.weight"], renamed[f"layers.{convs[-1]}.weight"]
    stages: list[list[int]] = [[]]
    for i in blocks:  # blocks between two plain convolutions form one stage
        if stages[-1] and any(stages[-1][-1] < c < i for c in convs):
            stages.append([])
        stages[-1].append(i)
    widths = [int(renamed[f"layers.{s[0]}.conv.0.weight"].shape[0]) for s in stages]
    config = {"latent_channels": int(first.shape[1]), "out_channels": int(last.shape[0]),
              "decoder_block_out_channels": tuple(widths), "num_decoder_blocks": tuple(len(s) for s in stages)}
    return renamed, config


def _read_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path}: a pickle file ({path.suffix}) can run code when loaded and is refused; "
                                  "use the .safetensors version, or allow it with --allow-pickle")
        from tui_diffusion.pipeline.models import read_pickle_checkpoint

        return read_pickle_checkpoint(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read this TAESD file: {exc}") from None


def load_taesd_decoder(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       allow_pickle: bool = False) -> Any:
    """An ``AutoencoderTiny`` whose decoder holds the TAESD decoder of ``path`` (the encoder stays unused)."""
    from diffusers import AutoencoderTiny

    state, diffusers_layout = _decoder_tensors(_read_state(path, allow_pickle))
    try:
        renamed, config = taesd_to_diffusers(state, diffusers_layout)
        model = AutoencoderTiny(**config)
        model.decoder.load_state_dict(renamed, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a TAESD decoder of a known layout ({first})") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def find_taesd(paths: ModelPaths, latent_format: LatentFormat) -> str | None:
    """The ``vae_approx`` file of the family's TAESD decoder, by ComfyUI's rule (the first name starting with
    the decoder's stem; ``.safetensors`` before a pickle)."""
    stem = latent_format.taesd_decoder
    if not stem:
        return None
    names = [n for n in paths.list("vae_approx") if Path(n).name.startswith(stem)]
    names.sort(key=lambda n: (Path(n).suffix.lower() in PICKLE_SUFFIXES, n.lower()))
    return names[0] if names else None


def choose_previewer(engine: Any, latent_format: LatentFormat, method: str = "auto") -> Previewer | None:
    """The previewer ``method`` asks for: TAESD (``taesd``, and ``auto`` when its file is there), else
    latent-to-RGB; None for ``none``. A TAESD file that cannot be loaded falls back to latent-to-RGB with a
    warning in the log: a preview is never worth failing a job over."""
    if method not in PREVIEW_METHODS:
        raise ValueError(f"preview method {method!r} is not one of {', '.join(PREVIEW_METHODS)}")
    if method == "none":
        return None
    if method in ("auto", "taesd"):
        name = find_taesd(engine.paths, latent_format)
        if name is not None:
            try:
                return TaesdPreviewer(_cached_decoder(engine, name))
            except (CheckpointError, OSError) as exc:
                log.warning("TAESD previews unavailable, using latent2rgb: %s", exc)
        elif method == "taesd":
            log.warning("TAESD previews asked for, but no %s file in vae_approx; using latent2rgb",
                        latent_format.taesd_decoder)
    if not latent_format.rgb_factors:
        return None
    return Latent2RGBPreviewer(latent_format)


def _cached_decoder(engine: Any, name: str) -> Any:
    """One loaded decoder per file version and device, kept with the engine's other small models."""
    path = engine.paths.resolve("vae_approx", name)
    dev = engine.device
    key = repr(("vae_approx", engine.paths.fingerprint("vae_approx", name), str(dev.torch_device),
                str(dev.vae_dtype)))
    cache = getattr(engine, "previewers", None)
    if cache is None:
        return load_taesd_decoder(path, dev.torch_device, dev.vae_dtype, engine.allow_pickle)
    return cache.get(key, lambda: load_taesd_decoder(path, dev.torch_device, dev.vae_dtype, engine.allow_pickle))

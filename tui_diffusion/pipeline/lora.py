"""LoRA files applied as patches: the cached base model is never changed for other jobs.

As in ComfyUI, LoraLoader does not touch weights: it returns the model (and CLIP) with a list of
patches. The sampler and the text encoder add the patches' deltas while they run and restore the
original weights afterwards. Files in the kohya/A1111 layout (``lora_unet_*``, ``lora_te_*``, with
diffusers-style or original-layout module names) and in diffusers/PEFT layouts are understood.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline.checkpoint_writer import unet_original_key
from tui_diffusion.pipeline.errors import NodeError


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA file's low-rank pairs, by normalised module key (``unet:down_blocks.0...``)."""

    source: str
    #: module key -> (down [r, in...], up [out, r...], alpha or None)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]


@dataclass(frozen=True)
class Patch:
    lora: LoraWeights
    strength: float


_KOHYA = re.compile(r"^(lora_unet|lora_te[12]?)_(.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")
_PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2|transformer)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|"
                   r"lora_down|lora_up|alpha)(?:\.weight)?$")
_PART = {"lora_unet": "unet", "lora_te": "te1", "lora_te1": "te1", "lora_te2": "te2",
         "unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2", "transformer": "transformer"}
#: the model parts LoRAs can be applied to; a file for another part is refused with what it is for
APPLIED_PARTS = {"unet": "the UNet", "te1": "the text encoder", "te2": "the second text encoder"}
_PART_LABELS = {"transformer": "a transformer model (SD3, Flux: keys 'transformer.*')"}


def load_lora(path: Path) -> LoraWeights:
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors LoRA files are supported")
    read_header(path)  # refuse a lying or truncated file before reading tensors
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read this LoRA: {exc}") from None
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        m = _KOHYA.match(key) or _PEFT.match(key)
        if not m:
            continue
        prefix, name, kind = m.groups()
        kind = {"lora_A": "down", "lora.down": "down", "lora_down": "down",
                "lora_B": "up", "lora.up": "up", "lora_up": "up"}.get(kind, kind)
        parts.setdefault(f"{_PART[prefix]}:{name}", {})[kind] = tensor
    pairs = {k: (v["down"].float(), v["up"].float(), float(v["alpha"]) if "alpha" in v else None)
             for k, v in parts.items() if "down" in v and "up" in v}
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights found (expected kohya 'lora_unet_*' or diffusers keys)")
    other = sorted({k.split(":", 1)[0] for k in pairs} - set(APPLIED_PARTS))
    if other:
        what = ", ".join(_PART_LABELS.get(part, part) for part in other)
        raise CheckpointError(f"{path}: a LoRA for {what}; LoRAs for that are not supported yet "
                              f"(supported: LoRAs for {', '.join(APPLIED_PARTS.values())} of SD1.x, SD2.x and SDXL)")
    return LoraWeights(str(path), pairs)


def _targets(module: torch.nn.Module, part: str, with_original_names: bool) -> dict[str, torch.nn.Module]:
    """Every layer a LoRA may name, under its dotted and its underscored name (kohya), for one model part."""
    out: dict[str, torch.nn.Module] = {}
    for name, mod in module.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        names = {name, "text_model." + name if part != "unet" and not name.startswith("text_model.") else name}
        if with_original_names:
            with contextlib.suppress(KeyError, ValueError, IndexError, TypeError):
                original = unet_original_key(name + ".weight", module.config.layers_per_block)
                if original:
                    names.add(original.removesuffix(".weight"))
        for n in names:
            out[f"{part}:{n}"] = mod
            out[f"{part}:{n.replace('.', '_')}"] = mod
    return out


def _fits(mod: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    weight = mod.weight
    return up.shape[0] == weight.shape[0] and down.flatten(1).shape[1] == weight.flatten(1).shape[1]


def _delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, weight: torch.Tensor) -> torch.Tensor:
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(weight.shape)


@contextlib.contextmanager
def patched(parts: dict[str, torch.nn.Module], patches: list[Patch]) -> Iterator[None]:
    """Add the patches' deltas to the named model parts, and restore the weights on the way out."""
    active = [p for p in patches if p.strength != 0.0]
    if not active:
        yield
        return
    tables: dict[str, dict[str, torch.nn.Module]] = {}  # built for the first LoRA
    #: id(parameter) -> (parameter, its value before any patch)
    backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for patch in active:
                if not isinstance(patch, Patch):  # a merge (pipeline/merge.py) sets what it changes itself
                    patch.apply(parts, backups)
                    continue
                if not tables:
                    tables = {part: _targets(module, part, part == "unet") for part, module in parts.items()}
                for key, (down, up, alpha) in patch.lora.pairs.items():
                    part = key.split(":", 1)[0]
                    mod = tables.get(part, {}).get(key)
                    if mod is None or not _fits(mod, down, up):
                        continue
                    if mod.weight.device.type == "meta":
                        raise NodeError("LoRAs cannot be applied with --novram (layer-by-layer offload) yet; "
                                        "use --lowvram")
                    if id(mod.weight) not in backups:
                        backups[id(mod.weight)] = (mod.weight, mod.weight.detach().clone())
                    delta = _delta(down, up, alpha, mod.weight) * patch.strength
                    mod.weight.add_(delta.to(mod.weight.device, mod.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for param, original in backups.values():
                param.copy_(original)


def matched_modules(parts: dict[str, torch.nn.Module], lora: LoraWeights) -> int:
    tables = {part: _targets(module, part, part == "unet") for part, module in parts.items()}
    count = 0
    for key, (down, up, _) in lora.pairs.items():
        mod = tables.get(key.split(":", 1)[0], {}).get(key)
        count += mod is not None and _fits(mod, down, up)
    return count

"""LoRA files applied as patches: the cached base model is never changed for other jobs.

As in ComfyUI, LoraLoader does not touch weights: it returns the model (and CLIP) with a list of
patches. The sampler and the text encoder add the patches' deltas while they run and restore the
original weights afterwards. Files in the kohya/A1111 layout (``lora_unet_*``, ``lora_te_*``, with
diffusers-style or original-layout module names) and in diffusers/PEFT layouts are understood. For the SD3 and
Flux transformers (the "unet" part here: the denoising network, whatever its kind), diffusers' names
(``transformer.*``) and, for Flux, Black Forest Labs' names (``diffusion_model.double_blocks.*``, kohya's
``lora_unet_double_blocks_*``) are understood; a fused layer of the latter (``img_attn.qkv``, ``linear1``) is cut
into the pairs of the separate layers diffusers' model has.
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


_KOHYA = re.compile(r"^(lora_unet|lora_transformer|lora_te[12]?)_(.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")
_PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2|transformer|diffusion_model)\.(.+?)\."
                   r"(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|alpha)(?:\.weight)?$")
#: a file's prefix -> the model part it patches ("unet" is the denoising network: a UNet or an SD3/Flux transformer)
_PART = {"lora_unet": "unet", "lora_transformer": "unet", "lora_te": "te1", "lora_te1": "te1", "lora_te2": "te2",
         "unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2", "transformer": "unet",
         "diffusion_model": "unet"}


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
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    for k, v in parts.items():
        if "down" in v and "up" in v:
            alpha = float(v["alpha"]) if "alpha" in v else None
            for name, up in flux_original_pairs(k, v["up"].float()):
                pairs[name] = (v["down"].float(), up, alpha)
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights found (expected kohya 'lora_unet_*' or diffusers keys)")
    return LoraWeights(str(path), pairs)


#: Black Forest Labs' Flux layer names -> diffusers' (the layers of one block; fused ones are cut below)
_FLUX_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_FLUX_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_FLUX_FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                   "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_BLOCK = re.compile(r"^(double_blocks|single_blocks)[._](\d+)[._](.+)$")


def flux_original_pairs(key: str, up: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A LoRA pair named in Black Forest Labs' Flux layout (dotted, or kohya's underscores) as the pairs of
    diffusers' ``FluxTransformer2DModel`` layers: ``(key, up matrix)``s sharing the pair's down matrix. A fused
    layer's up rows are cut as the loader cuts its weight (q, k, v; single blocks' q, k, v and the 4x MLP); the
    final modulation's halves are swapped, as its weight is. Any other key comes back unchanged."""
    from tui_diffusion.modelfiles.convert_dit import _FLUX_DOUBLE, _swap_halves

    part, _, name = key.partition(":")
    if part != "unet":
        return [(key, up)]

    def plain(table: dict[str, str], leaf: str) -> str | None:
        return next((ours for theirs, ours in table.items() if leaf in (theirs, theirs.replace(".", "_"))), None)

    if name in ("final_layer.adaLN_modulation.1", "final_layer_adaLN_modulation_1"):
        return [("unet:norm_out.linear", _swap_halves(up))]
    if (top := plain(_FLUX_TOP, name)) is not None:
        return [(f"unet:{top}", up)]
    m = _FLUX_BLOCK.match(name)
    if m is None:
        return [(key, up)]
    kind, index, leaf = m.groups()
    block = f"unet:{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}."
    if kind == "double_blocks":
        fused = next((names for theirs, names in _FLUX_FUSED_QKV.items()
                      if leaf in (theirs, theirs.replace(".", "_"))), None)
        if fused is not None and up.shape[0] % 3 == 0:
            return [(block + n, piece) for n, piece in zip(fused, up.chunk(3, dim=0), strict=True)]
        single = plain(_FLUX_DOUBLE, leaf)
    else:
        if leaf == "linear1" and up.shape[0] % 7 == 0:  # q, k, v (hidden each) and the MLP (4 x hidden)
            hidden = up.shape[0] // 7
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            return [(block + n, piece)
                    for n, piece in zip(names, up.split([hidden] * 3 + [4 * hidden], dim=0), strict=True)]
        single = plain(_FLUX_SINGLE, leaf)
    return [(block + single, up)] if single is not None else [(key, up)]


def _targets(module: torch.nn.Module, part: str, with_original_names: bool) -> dict[str, torch.nn.Module]:
    """Every layer a LoRA may name, under its dotted and its underscored name (kohya), for one model part."""
    out: dict[str, torch.nn.Module] = {}
    # the original (LDM) names of an SD UNet's layers; a transformer has none (its LoRAs name diffusers' layers,
    # or Flux's original layers, which ``flux_original_pairs`` renamed)
    layers = getattr(getattr(module, "config", None), "layers_per_block", None)
    with_original_names = with_original_names and layers is not None
    for name, mod in module.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        names = {name, "text_model." + name if part != "unet" and not name.startswith("text_model.") else name}
        if with_original_names:
            with contextlib.suppress(KeyError, ValueError, IndexError, TypeError):
                original = unet_original_key(name + ".weight", layers)
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
                    if mod.weight.dtype == torch.float32:
                        mod.weight.add_(delta.to(mod.weight.device))
                    else:  # half precision or fp8 storage (which has no addition): add in float32, round once
                        sum_ = mod.weight.float() + delta.to(mod.weight.device, torch.float32)
                        mod.weight.copy_(sum_.to(mod.weight.dtype))
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

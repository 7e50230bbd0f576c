"""Write small random LoRA files for SD3/SD3.5 and Flux.1 transformers in the layouts people have (tests, demos).

Layouts (``LAYOUTS``), each as its trainer or converter writes it:

- ``comfyui``: the original layer names under ``diffusion_model.``, ``lora_A``/``lora_B`` (ComfyUI's own files);
- ``bfl``: the original names with no prefix (Black Forest Labs' files);
- ``kohya``: ``lora_unet_`` and the original name with underscores, ``lora_down``/``lora_up`` and ``alpha``;
- ``peft``: diffusers' layer names under ``transformer.``, ``lora_A``/``lora_B`` (diffusers' trainers);
- ``onetrainer``: ``lora_transformer_`` and diffusers' name with underscores, ``lora_down``/``lora_up``, ``alpha``;
- ``xlabs`` (Flux only; also USO's DiT LoRA): ``double_blocks.N.processor.{qkv,proj}_lora{1,2}`` (image, text) and
  ``single_blocks.N.processor.{qkv,proj}_lora``, ``down``/``up`` (no alpha).

``write_flux_control_lora`` writes Black Forest Labs' Depth/Canny control LoRA layout: LoRA pairs with biases on
the up layer, full RMS-norm scales, and an ``img_in`` pair that reads twice the model's input channels (as
published, or as ComfyUI's converter rewrites it: ``diff_b``, ``set_weight``, ``reshape_weight``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.pipeline.checkpoint_writer_dit import flux_to_original, save, sd3_to_original
from tui_diffusion.pipeline.lora import XLABS_LAYERS

LAYOUTS = ("comfyui", "bfl", "kohya", "peft", "onetrainer", "xlabs")


def _kind(model: Any) -> str:
    from tui_diffusion.pipeline.lora_dit import kind

    found = kind(model)
    if found is None:
        raise ValueError(f"not an SD3 or Flux transformer: {type(model).__name__}")
    return found


def original_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights in the original layout (no prefix), as ComfyUI holds them."""
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    config = model.config
    if _kind(model) == "flux":
        return flux_to_original(state, int(config.num_layers), int(config.num_single_layers))
    return sd3_to_original(state, int(config.num_layers), prefix="")


def original_layers(model: Any) -> dict[str, torch.Size]:
    """Every layer with a matrix (or convolution) weight, by its original name -> its weight's shape."""
    return {k.removesuffix(".weight"): v.shape for k, v in original_state(model).items()
            if k.endswith(".weight") and v.ndim >= 2}


def diffusers_layers(model: Any) -> dict[str, torch.Size]:
    return {name: mod.weight.shape for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}


def random_pairs(shapes: dict[str, torch.Size], rank: int = 2, seed: int = 0,
                 scale: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per layer: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        down = torch.randn(rank, *shape[1:], generator=gen) * scale
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen) * scale
        out[name] = (down, up)
    return out


def lora_state(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str,
               alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``layout`` for pairs named as the layout names layers (original names for
    comfyui/bfl/kohya/xlabs, diffusers' for peft/onetrainer)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
    if layout == "xlabs":
        return _xlabs(pairs)
    sd: dict[str, torch.Tensor] = {}
    for name, (down, up) in pairs.items():
        if layout in ("comfyui", "bfl", "peft"):
            key = {"comfyui": "diffusion_model.", "bfl": "", "peft": "transformer."}[layout] + name
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
        else:
            key = ("lora_unet_" if layout == "kohya" else "lora_transformer_") + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    return sd


def _xlabs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in pairs.items():
        block, _, layer = name.partition(".")
        index, _, layer = layer.partition(".")
        theirs = next((x for x, ours in XLABS_LAYERS.items() if ours == layer), None)
        if theirs is None:
            raise ValueError(f"{name}: XLabs LoRAs patch attention layers only")
        key = f"{block}.{index}.processor.{theirs}"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    return sd


def xlabs_layers(model: Any) -> dict[str, torch.Size]:
    """The original Flux layers an XLabs/USO LoRA patches (single blocks: only linear1's q, k, v rows)."""
    layers = original_layers(model)
    out = {}
    for name, shape in layers.items():
        block, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        if block == "double_blocks" and layer in ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"):
            out[name] = shape
        elif block == "single_blocks" and layer == "linear2":
            out[name] = shape
        elif block == "single_blocks" and layer == "linear1":
            hidden = int(model.config.num_attention_heads) * int(model.config.attention_head_dim)
            out[f"{block}.{index}.linear1_qkv"] = torch.Size([3 * hidden, shape[1]])
    return out


def write_dit_lora(path: str | os.PathLike[str], model: Any, layout: str, rank: int = 2, seed: int = 0,
                   alpha: float | None = None, layers: tuple[str, ...] | None = None) -> Path:
    """A LoRA for every layer of ``model`` its layout can name (or for ``layers``, named as the layout names
    them), random values; returns the path."""
    if layout == "xlabs":
        if _kind(model) != "flux":
            raise ValueError("XLabs LoRAs are for Flux")
        shapes = xlabs_layers(model)
    elif layout in ("peft", "onetrainer"):
        shapes = diffusers_layers(model)
    else:
        shapes = original_layers(model)
    if layers is not None:
        shapes = {n: shapes[n] for n in layers}
    return save(lora_state(random_pairs(shapes, rank, seed), layout, alpha), path)


def write_flux_control_lora(path: str | os.PathLike[str], model: Any, rank: int = 2, seed: int = 0,
                            layout: str = "bfl", input_factor: int = 2) -> Path:
    """Black Forest Labs' control LoRA layout (Depth/Canny dev LoRAs) for a Flux ``model``: a pair for every layer,
    a bias on each up layer, every RMS norm's scale, and ``img_in`` reading ``input_factor`` times the model's input
    channels. ``layout`` "bfl" as published, "comfyui" as ComfyUI's converter rewrites it."""
    if _kind(model) != "flux":
        raise ValueError("control LoRAs are for Flux")
    state = original_state(model)
    shapes = original_layers(model)
    shapes["img_in"] = torch.Size([shapes["img_in"][0], shapes["img_in"][1] * input_factor])
    gen = torch.Generator().manual_seed(seed + 1)
    sd = lora_state(random_pairs(shapes, rank, seed), "bfl")
    for name in shapes:
        if f"{name}.bias" in state:
            sd[f"{name}.lora_B.bias"] = torch.randn(shapes[name][0], generator=gen) * 0.05
    for name, value in state.items():
        if name.endswith("_norm.scale"):
            sd[name] = 1.0 + torch.randn(value.shape, generator=gen) * 0.1
    if layout == "comfyui":
        renamed = {k.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.scale.set_weight"): v
                   for k, v in sd.items()}
        sd = {"diffusion_model." + k: v for k, v in renamed.items()}
        sd["diffusion_model.img_in.reshape_weight"] = torch.tensor(list(shapes["img_in"]))
    elif layout != "bfl":
        raise ValueError(f"control LoRA layout {layout!r}: bfl or comfyui")
    return save(sd, path)

"""Write random-weight ControlNets and T2I-Adapters in the layouts they are published in (tests, demos).

ControlNets: lllyasviel's original single-file layout (``control_model.*``: the UNet's encoder keys as in a
checkpoint, ``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``), optionally stored as a
difference to a model (kohya's ``difference`` files), or diffusers' layout. T2I-Adapters: TencentARC's
original layout (``conv_in``, ``body.N``) or diffusers' (``adapter.*``). The key mapping is the inverse of the
one ``pipeline/controlnet.py`` reads; the tests also load written files with diffusers' own single-file loader.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.pipeline.checkpoint_writer import _save, unet_original_key

#: the hint encoder's widths of every published ControlNet (diffusers' default)
HINT_CHANNELS = (16, 32, 96, 256)


def build_controlnet(unet: Any, seed: int = 0, hint_channels: tuple[int, ...] = HINT_CHANNELS) -> Any:
    """A random ControlNet for ``unet``'s architecture. The zero-initialised output convolutions of a fresh
    ControlNet are given random weights too, so that it changes the image as a trained one does."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels,
                                    load_weights_from_unet=False)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()
    return net.eval()


def build_t2i_adapter(channels: tuple[int, ...], seed: int = 0, in_channels: int = 3) -> Any:
    """A random full T2I-Adapter (two residual blocks per level, 8x pixel unshuffle) with these level widths."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=2, downscale_factor=8,
                      adapter_type="full_adapter").eval()


def controlnet_to_original(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers' ControlNet keys -> the original layout, ``control_model.`` prefix included."""
    n_hint = len({m.group(1) for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)$", key):
            index = 0 if m.group(1) == "conv_in" else 2 * (n_hint + 1) if m.group(1) == "conv_out" else \
                2 * (int(m.group(2)) + 1)
            new = f"input_hint_block.{index}.{m.group(3)}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)$", key):
            new = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block."):]
        else:
            new = unet_original_key(key, layers)
        out["control_model." + new] = value
    return out


def write_controlnet(path: str | os.PathLike[str], net: Any, layout: str = "original", difference_to: Any = None,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write ``net`` as a single file: ``layout`` "original" or "diffusers"; ``difference_to`` (a UNet): store
    the original layout as the difference to that model's weights, with kohya's ``difference`` marker."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if difference_to is not None:
        if layout != "original":
            raise ValueError("difference files are in the original layout")
        base = difference_to.state_dict()
        state = {k: v - base[k] if k in base and base[k].shape == v.shape else v for k, v in state.items()}
    if layout == "original":
        state = controlnet_to_original(state, net.config.layers_per_block)
        if difference_to is not None:
            state["difference"] = torch.zeros(1)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    return _save(state, Path(path), dtype)


def adapter_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' full T2I-Adapter keys -> TencentARC's layout (two residual blocks per level, flattened)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("adapter.conv_in."):
            out[key[len("adapter."):]] = value
        elif m := re.match(r"adapter\.body\.(\d+)\.in_conv\.(.+)$", key):
            out[f"body.{2 * int(m.group(1))}.in_conv.{m.group(2)}"] = value
        elif m := re.match(r"adapter\.body\.(\d+)\.resnets\.([01])\.(.+)$", key):
            out[f"body.{2 * int(m.group(1)) + int(m.group(2))}.{m.group(3)}"] = value
        else:
            raise KeyError(key)
    return out


def write_t2i_adapter(path: str | os.PathLike[str], adapter: Any, layout: str = "original",
                      dtype: torch.dtype = torch.float32) -> Path:
    state = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    if layout == "original":
        state = adapter_to_original(state)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    return _save(state, Path(path), dtype)

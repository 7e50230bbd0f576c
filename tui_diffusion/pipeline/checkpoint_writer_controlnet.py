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


# -- SD3/SD3.5 and Flux ControlNets -----------------------------------------------------------------------------
def _randomise(net: Any) -> Any:
    """Random values where diffusers zero-initialises (output projections, hint embedding), so that the
    ControlNet changes the image as a trained one does."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return net.eval()


def build_sd3_controlnet(transformer: Any, num_layers: int = 1, seed: int = 0, extra_conditioning_channels: int = 0
                         ) -> Any:
    """A random ControlNet in diffusers' SD3 layout (InstantX's SD3 ControlNets) for ``transformer``'s size."""
    from diffusers import SD3ControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    return _randomise(SD3ControlNetModel(
        sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels, num_layers=num_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, caption_projection_dim=c.caption_projection_dim,
        pooled_projection_dim=c.pooled_projection_dim, out_channels=c.out_channels,
        pos_embed_max_size=c.pos_embed_max_size, extra_conditioning_channels=extra_conditioning_channels))


def build_sd35_controlnet(transformer: Any, num_layers: int = 1, seed: int = 0) -> Any:
    """A random ControlNet shaped as Stability's SD3.5 Large ones (blur, canny, depth) for ``transformer``'s size:
    self-attention blocks without context, no patch embedding of its own."""
    from diffusers import SD3ControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    inner = c.num_attention_heads * c.attention_head_dim
    return _randomise(SD3ControlNetModel(
        patch_size=c.patch_size, in_channels=c.in_channels, num_layers=num_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads, joint_attention_dim=None,
        caption_projection_dim=inner, pooled_projection_dim=c.pooled_projection_dim, out_channels=c.out_channels,
        pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False))


def build_flux_controlnet(transformer: Any, num_layers: int = 1, num_single_layers: int = 1, seed: int = 0,
                          num_mode: int | None = None) -> Any:
    """A random Flux ControlNet in the InstantX/Shakker layout (``num_mode``: a union one with that many tasks)."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    return _randomise(FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
        guidance_embeds=c.guidance_embeds, axes_dims_rope=list(c.axes_dims_rope), num_mode=num_mode))


def build_xlabs_controlnet(transformer: Any, num_layers: int = 2, seed: int = 0) -> Any:
    """A random Flux ControlNet shaped as XLabs' (double blocks only, the hint through its own 16-channel
    convolutions, cut into 2x2 patches), as diffusers' ``FluxControlNetModel`` holds it."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    return _randomise(FluxControlNetModel(
        patch_size=2, in_channels=64, num_layers=num_layers, num_single_layers=0,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
        guidance_embeds=c.guidance_embeds, axes_dims_rope=list(c.axes_dims_rope), conditioning_embedding_channels=16))


_XLABS_HINT = {"conv_in": 0, "conv_out": 14, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}}


def xlabs_to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """``FluxControlNetModel`` keys (XLabs-shaped) -> XLabs' file: Black Forest Labs' keys for the double blocks and
    embedders, ``controlnet_blocks``, ``pos_embed_input`` and the hint convolutions as ``input_hint_block.N``."""
    from tui_diffusion.pipeline.checkpoint_writer_dit import flux_to_original

    hidden = state["x_embedder.weight"].shape[0]
    placeholders = {"proj_out.weight": torch.zeros(1), "proj_out.bias": torch.zeros(1),
                    "norm_out.linear.weight": torch.zeros(2 * hidden), "norm_out.linear.bias": torch.zeros(2 * hidden)}
    base = {k: v for k, v in state.items() if not k.startswith(("controlnet_", "input_hint_block."))}
    out = {k: v for k, v in flux_to_original({**base, **placeholders}, num_layers, 0).items()
           if not k.startswith("final_layer.")}
    for key, value in state.items():
        if key.startswith("controlnet_blocks."):
            out[key] = value
        elif key.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + key[len("controlnet_x_embedder."):]] = value
        elif m := re.match(r"input_hint_block\.(.+)\.(weight|bias)$", key):
            out[f"input_hint_block.{_XLABS_HINT[m.group(1)]}.{m.group(2)}"] = value
    return out


_SD35_BLOCK = {"attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
               "norm1.linear": "adaLN_modulation.1"}


def sd35_controlnet_to_original(state: dict[str, torch.Tensor], control_type: int) -> dict[str, torch.Tensor]:
    """``SD3ControlNetModel`` keys -> Stability's SD3.5 ControlNet file: blocks with a fused qkv and the MMDiT's
    block names, the embedders under diffusers' names (as the published files have them), ``control_type``
    (0 blur, 1 canny, 2 depth)."""
    out: dict[str, torch.Tensor] = {"control_type": torch.tensor([float(control_type)])}
    for key, value in state.items():
        if m := re.match(r"(transformer_blocks\.\d+\.)attn\.to_([qkv])\.(weight|bias)$", key):
            if m.group(2) == "q":
                out[f"{m.group(1)}attn.qkv.{m.group(3)}"] = torch.cat(
                    [state[f"{m.group(1)}attn.to_{x}.{m.group(3)}"] for x in "qkv"])
            continue
        if m := re.match(r"(transformer_blocks\.\d+\.)(.+)\.(weight|bias)$", key):
            if m.group(2) not in _SD35_BLOCK:
                raise KeyError(key)
            out[f"{m.group(1)}{_SD35_BLOCK[m.group(2)]}.{m.group(3)}"] = value
            continue
        out[key] = value
    return out


def write_dit_controlnet(path: str | os.PathLike[str], net: Any, layout: str = "diffusers", control_type: int = 0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write an SD3 or Flux ControlNet: ``layout`` "diffusers" (InstantX/Shakker files, diffusers' keys), "sd35"
    (Stability's SD3.5 Large ControlNets, with ``control_type``) or "xlabs" (XLabs' Flux ControlNets)."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if layout == "sd35":
        state = sd35_controlnet_to_original(state, control_type)
    elif layout == "xlabs":
        state = xlabs_to_original(state, net.config.num_layers)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    return _save(state, Path(path), dtype)

"""Random-weight GLIGEN and hypernetwork files in their published layouts, for tests and demos.

GLIGEN: ComfyUI's single file (``{original block}.transformer_blocks.K.fuser.*`` per transformer block of the UNet,
``position_net.*``). Hypernetworks: A1111's ``.pt`` dict (``{width: [key MLP state dict, value MLP state dict]}``
with the flags beside), or the same flattened into ``.safetensors`` with the flags as header metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def gligen_state_dict(unet: Any, text_width: int, seed: int = 0, gates: tuple[float, float] = (0.5, 0.5),
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """A GLIGEN text-box model for ``unet`` (a diffusers UNet) in ComfyUI's layout: a fuser per transformer block
    (widths and heads of the block), grounding tokens as wide as the UNet's text context, phrases ``text_width``
    wide. ``gates``: the fusers' (alpha_attn, alpha_dense); 0 closes a gate (tanh(0) = 0)."""
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    from tui_diffusion.pipeline.gligen import transformer_blocks

    torch.manual_seed(seed)
    context = unet.config.cross_attention_dim
    state: dict[str, torch.Tensor] = {}
    for name, block in transformer_blocks(unet).items():
        dim = block.attn1.query_dim
        heads = block.attn1.heads
        fuser = GatedSelfAttentionDense(dim, context, heads, dim // heads)
        with torch.no_grad():
            fuser.alpha_attn.fill_(gates[0])
            fuser.alpha_dense.fill_(gates[1])
            for norm in (fuser.norm1, fuser.norm2):
                norm.weight.normal_(1.0, 0.1)
                norm.bias.normal_(0.0, 0.1)
        state.update({f"{prefix}{name}.fuser.{k}": v.detach().clone() for k, v in fuser.state_dict().items()})
    net = GLIGENTextBoundingboxProjection(positive_len=text_width, out_dim=context, feature_type="text-only")
    with torch.no_grad():
        net.null_positive_feature.normal_()
        net.null_position_feature.normal_()
    state.update({f"{prefix}position_net.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    return state


def write_gligen(path: str | os.PathLike[str], state: dict[str, torch.Tensor]) -> Path:
    """Save as .safetensors, or as a pickle (``torch.save``) for any other suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path


def hypernetwork_dict(widths: tuple[int, ...], layer_structure: tuple[float, ...] = (1, 2, 1),
                      activation_func: str = "relu", is_layer_norm: bool = False, use_dropout: bool = False,
                      activate_output: bool = False, last_layer_dropout: bool = False,
                      seed: int = 0) -> dict[Any, Any]:
    """An A1111 hypernetwork: per width two MLPs of ``layer_structure`` (multiples of the width), their state dict
    keys numbered as A1111's Sequential numbers its layers (activation and dropout layers hold no tensors)."""
    torch.manual_seed(seed)
    out: dict[Any, Any] = {}
    for width in widths:
        pair = []
        for _ in range(2):
            sd: dict[str, torch.Tensor] = {}
            index = 0
            n = len(layer_structure) - 1
            for i in range(n):
                d_in, d_out = int(width * layer_structure[i]), int(width * layer_structure[i + 1])
                sd[f"linear.{index}.weight"] = torch.randn(d_out, d_in) * 0.1
                sd[f"linear.{index}.bias"] = torch.randn(d_out) * 0.1
                index += 1
                if activation_func != "linear" and (i < n - 1 or activate_output):
                    index += 1
                if is_layer_norm:
                    sd[f"linear.{index}.weight"] = 1 + torch.randn(d_out) * 0.1
                    sd[f"linear.{index}.bias"] = torch.randn(d_out) * 0.1
                    index += 1
                if use_dropout and (i < n - 1 or last_layer_dropout):
                    index += 1
            pair.append(sd)
        out[width] = pair
    out.update({"layer_structure": list(layer_structure), "activation_func": activation_func,
                "is_layer_norm": is_layer_norm, "use_dropout": use_dropout, "activate_output": activate_output,
                "last_layer_dropout": last_layer_dropout, "name": "tiny", "step": 0})
    return out


def write_hypernetwork(path: str | os.PathLike[str], data: dict[Any, Any]) -> Path:
    """A1111's pickle for ``.pt``; for ``.safetensors`` the tensors as ``{width}.{0|1}.{layer}`` and the flags as
    JSON values in the header's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".safetensors":
        torch.save(data, str(path))
        return path
    from safetensors.torch import save_file

    tensors = {f"{width}.{i}.{k}": v.contiguous() for width, pair in data.items() if isinstance(width, int)
               for i, sd in enumerate(pair) for k, v in sd.items()}
    meta = {k: json.dumps(v) for k, v in data.items() if not isinstance(k, int)}
    save_file(tensors, str(path), metadata=meta)
    return path

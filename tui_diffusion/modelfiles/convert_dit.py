"""SD3/SD3.5 and Flux.1 transformers: their diffusers configs from tensor shapes, and their keys converted.

Published files keep the original layouts: Stability's MMDiT keys for SD3.x (``joint_blocks.N.x_block...``,
under ``model.diffusion_model.`` in Stability's files, bare in some diffusion-model-only files) and Black
Forest Labs' keys for Flux.1 (``double_blocks.N.img_attn...``, no prefix; ``model.diffusion_model.`` in
all-in-one checkpoints). diffusers' own single-file Flux converter hard-codes the full width (3072), so it
cannot read a smaller file; the conversion here reads every width from the tensors and so loads full-size and
tiny test files alike.

The config functions are torch-free (they read a safetensors header); the conversions take a name -> tensor
mapping and import torch themselves.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo

#: prefixes a diffusion model's keys carry in the files that are published
MODEL_PREFIXES = ("model.diffusion_model.", "")
SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
FLUX_KEY = "double_blocks.0.img_attn.qkv.weight"
#: SD3's MMDiT uses 64 channels per head; Flux 128 (its rotary axes are fixed at 16 + 56 + 56)
SD3_HEAD_DIM = 64
FLUX_HEAD_DIM = 128
FLUX_ROPE_AXES = (16, 56, 56)
CONFIG_PACKAGE = "tui_diffusion.configs"


def model_prefix(keys: Mapping[str, Any] | Any, probe: str) -> str | None:
    """The prefix under which a file holds the transformer whose key ``probe`` identifies (None: not there)."""
    for prefix in MODEL_PREFIXES:
        if prefix + probe in keys:
            return prefix
    return None


def shipped_config(name: str) -> dict[str, Any]:
    """The shipped full-size transformer config ``tui_diffusion/configs/<name>/transformer/config.json``."""
    path = Path(str(resources.files(CONFIG_PACKAGE).joinpath(name, "transformer", "config.json")))
    return json.loads(path.read_text(encoding="utf-8"))


def _count(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _shape(header: Mapping[str, TensorInfo], key: str, file: str) -> tuple[int, ...]:
    try:
        return header[key].shape
    except KeyError:
        raise CheckpointError(f"{file}: incomplete checkpoint: tensor {key!r} is missing") from None


# -- SD3 / SD3.5 -----------------------------------------------------------------------------------------------
def sd3_config(header: Mapping[str, TensorInfo], file: str, prefix: str = "model.diffusion_model.") -> dict[str, Any]:
    """An ``SD3Transformer2DModel`` config from an MMDiT file's shapes (64 channels per head, as in SD3)."""
    p = prefix
    keys = [k[len(p):] for k in header if k.startswith(p)]
    proj = _shape(header, p + "x_embedder.proj.weight", file)
    hidden, in_channels, patch = proj[0], proj[1], proj[2]
    layers = _count(keys, r"joint_blocks\.(\d+)\.")
    if hidden % SD3_HEAD_DIM:
        raise CheckpointError(f"{file}: an MMDiT of width {hidden} (not a multiple of {SD3_HEAD_DIM})")
    context = _shape(header, p + "context_embedder.weight", file)
    pos = _shape(header, p + "pos_embed", file)
    pos_max = math.isqrt(pos[1])
    if pos_max * pos_max != pos[1]:
        raise CheckpointError(f"{file}: pos_embed holds {pos[1]} positions, not a square grid")
    dual_rx = re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")
    dual = sorted(int(m.group(1)) for k in keys if (m := dual_rx.match(k)))
    out = _shape(header, p + "final_layer.linear.weight", file)[0] // (patch * patch)
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": layers,
        "attention_head_dim": SD3_HEAD_DIM,
        "num_attention_heads": hidden // SD3_HEAD_DIM,
        "joint_attention_dim": context[1],
        "caption_projection_dim": context[0],
        "pooled_projection_dim": _shape(header, p + "y_embedder.mlp.0.weight", file)[1],
        "out_channels": out,
        "pos_embed_max_size": pos_max,
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if p + "joint_blocks.0.x_block.attn.ln_q.weight" in header else None,
    }


def _swap_halves(t: Any) -> Any:
    """(shift, scale) -> (scale, shift): the original's final modulation orders them the other way round."""
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_to_diffusers(state: Mapping[str, Any], config: dict[str, Any], prefix: str = "model.diffusion_model.",
                     get: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Stability's MMDiT keys -> ``SD3Transformer2DModel``'s. ``get`` reads one tensor by its full name
    (default ``state[name]``), so a caller can stream tensors from a file."""
    read = get or state.__getitem__

    def t(name: str) -> Any:
        return read(prefix + name)

    out: dict[str, Any] = {
        "pos_embed.pos_embed": t("pos_embed"),
        "pos_embed.proj.weight": t("x_embedder.proj.weight"),
        "pos_embed.proj.bias": t("x_embedder.proj.bias"),
        "context_embedder.weight": t("context_embedder.weight"),
        "context_embedder.bias": t("context_embedder.bias"),
        "proj_out.weight": t("final_layer.linear.weight"),
        "proj_out.bias": t("final_layer.linear.bias"),
        "norm_out.linear.weight": _swap_halves(t("final_layer.adaLN_modulation.1.weight")),
        "norm_out.linear.bias": _swap_halves(t("final_layer.adaLN_modulation.1.bias")),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for i, j in ((1, 0), (2, 2)):
            for kind in ("weight", "bias"):
                out[f"time_text_embed.{ours}.linear_{i}.{kind}"] = t(f"{theirs}.mlp.{j}.{kind}")
    last = config["num_layers"] - 1
    qk_norm = config.get("qk_norm") is not None
    for i in range(config["num_layers"]):
        src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for part, names in (("x_block.attn", ("to_q", "to_k", "to_v")),
                                ("context_block.attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                for name, piece in zip(names, t(f"{src}{part}.qkv.{kind}").chunk(3, dim=0), strict=True):
                    out[f"{dst}attn.{name}.{kind}"] = piece
            out[f"{dst}attn.to_out.0.{kind}"] = t(f"{src}x_block.attn.proj.{kind}")
            out[f"{dst}norm1.linear.{kind}"] = t(f"{src}x_block.adaLN_modulation.1.{kind}")
            context_mod = t(f"{src}context_block.adaLN_modulation.1.{kind}")
            # the last block's context side only feeds the attention (shift, scale): diffusers orders them
            out[f"{dst}norm1_context.linear.{kind}"] = _swap_halves(context_mod) if i == last else context_mod
            out[f"{dst}ff.net.0.proj.{kind}"] = t(f"{src}x_block.mlp.fc1.{kind}")
            out[f"{dst}ff.net.2.{kind}"] = t(f"{src}x_block.mlp.fc2.{kind}")
            if i != last:
                out[f"{dst}attn.to_add_out.{kind}"] = t(f"{src}context_block.attn.proj.{kind}")
                out[f"{dst}ff_context.net.0.proj.{kind}"] = t(f"{src}context_block.mlp.fc1.{kind}")
                out[f"{dst}ff_context.net.2.{kind}"] = t(f"{src}context_block.mlp.fc2.{kind}")
            if i in config.get("dual_attention_layers", ()):
                for name, piece in zip(("to_q", "to_k", "to_v"), t(f"{src}x_block.attn2.qkv.{kind}").chunk(3, dim=0),
                                       strict=True):
                    out[f"{dst}attn2.{name}.{kind}"] = piece
                out[f"{dst}attn2.to_out.0.{kind}"] = t(f"{src}x_block.attn2.proj.{kind}")
        if qk_norm:
            out[f"{dst}attn.norm_q.weight"] = t(f"{src}x_block.attn.ln_q.weight")
            out[f"{dst}attn.norm_k.weight"] = t(f"{src}x_block.attn.ln_k.weight")
            out[f"{dst}attn.norm_added_q.weight"] = t(f"{src}context_block.attn.ln_q.weight")
            out[f"{dst}attn.norm_added_k.weight"] = t(f"{src}context_block.attn.ln_k.weight")
            if i in config.get("dual_attention_layers", ()):
                out[f"{dst}attn2.norm_q.weight"] = t(f"{src}x_block.attn2.ln_q.weight")
                out[f"{dst}attn2.norm_k.weight"] = t(f"{src}x_block.attn2.ln_k.weight")
    return out


# -- Flux.1 ----------------------------------------------------------------------------------------------------
def flux_config(header: Mapping[str, TensorInfo], file: str, prefix: str = "") -> dict[str, Any]:
    """A ``FluxTransformer2DModel`` config from a Flux file's shapes (128 channels per head, as Flux's fixed
    rotary axes require)."""
    p = prefix
    keys = [k[len(p):] for k in header if k.startswith(p)]
    img_in = _shape(header, p + "img_in.weight", file)
    hidden = img_in[0]
    if hidden % FLUX_HEAD_DIM:
        raise CheckpointError(f"{file}: a Flux transformer of width {hidden} (not a multiple of {FLUX_HEAD_DIM}, "
                              "which Flux's rotary embedding needs)")
    mlp = _shape(header, p + "double_blocks.0.img_mlp.0.weight", file)[0]
    if mlp != 4 * hidden:
        raise CheckpointError(f"{file}: a Flux transformer with an MLP of {mlp} for width {hidden} (4x expected)")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": img_in[1],
        "out_channels": _shape(header, p + "final_layer.linear.weight", file)[0],
        "num_layers": _count(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(keys, r"single_blocks\.(\d+)\."),
        "attention_head_dim": FLUX_HEAD_DIM,
        "num_attention_heads": hidden // FLUX_HEAD_DIM,
        "joint_attention_dim": _shape(header, p + "txt_in.weight", file)[1],
        "pooled_projection_dim": _shape(header, p + "vector_in.in_layer.weight", file)[1],
        "guidance_embeds": p + "guidance_in.in_layer.weight" in header,
        "axes_dims_rope": list(FLUX_ROPE_AXES),
    }


_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_FLUX_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
               "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}


def flux_to_diffusers(state: Mapping[str, Any], config: dict[str, Any], prefix: str = "",
                      get: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Black Forest Labs' Flux keys -> ``FluxTransformer2DModel``'s, widths read from the config."""
    read = get or state.__getitem__

    def t(name: str) -> Any:
        return read(prefix + name)

    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, Any] = {}
    embedders = [("timestep_embedder", "time_in"), ("text_embedder", "vector_in")]
    if config.get("guidance_embeds"):
        embedders.append(("guidance_embedder", "guidance_in"))
    for kind in ("weight", "bias"):
        for ours, theirs in embedders:
            out[f"time_text_embed.{ours}.linear_1.{kind}"] = t(f"{theirs}.in_layer.{kind}")
            out[f"time_text_embed.{ours}.linear_2.{kind}"] = t(f"{theirs}.out_layer.{kind}")
        out[f"context_embedder.{kind}"] = t(f"txt_in.{kind}")
        out[f"x_embedder.{kind}"] = t(f"img_in.{kind}")
        out[f"proj_out.{kind}"] = t(f"final_layer.linear.{kind}")
        out[f"norm_out.linear.{kind}"] = _swap_halves(t(f"final_layer.adaLN_modulation.1.{kind}"))
    for i in range(config["num_layers"]):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            for theirs, ours in _FLUX_DOUBLE.items():
                out[f"{dst}{ours}.{kind}"] = t(f"{src}{theirs}.{kind}")
            for side, names in (("img_attn", ("to_q", "to_k", "to_v")),
                                ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                for name, piece in zip(names, t(f"{src}{side}.qkv.{kind}").chunk(3, dim=0), strict=True):
                    out[f"{dst}attn.{name}.{kind}"] = piece
        for theirs, ours in _FLUX_NORMS.items():
            out[f"{dst}{ours}.weight"] = t(f"{src}{theirs}.scale")
    for i in range(config["num_single_layers"]):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v, mlp = t(f"{src}linear1.{kind}").split([hidden, hidden, hidden, 4 * hidden], dim=0)
            out[f"{dst}attn.to_q.{kind}"], out[f"{dst}attn.to_k.{kind}"] = q, k
            out[f"{dst}attn.to_v.{kind}"], out[f"{dst}proj_mlp.{kind}"] = v, mlp
            out[f"{dst}proj_out.{kind}"] = t(f"{src}linear2.{kind}")
            out[f"{dst}norm.linear.{kind}"] = t(f"{src}modulation.lin.{kind}")
        out[f"{dst}attn.norm_q.weight"] = t(f"{src}norm.query_norm.scale")
        out[f"{dst}attn.norm_k.weight"] = t(f"{src}norm.key_norm.scale")
    return out

"""Write random-weight SD3/SD3.5 and Flux.1 files in the layouts they are published in (tests and demos).

What is written, and where ComfyUI keeps it:

- transformers (``diffusion_models/``): Stability's MMDiT keys under ``model.diffusion_model.`` (SD3.5), Black
  Forest Labs' keys with no prefix (``flux1-dev.safetensors``; dev embeds the guidance, schnell does not);
- VAEs (``vae/``): the LDM layout with no prefix, 16 latent channels (Flux's ``ae.safetensors``, SD3's VAE);
- text encoders (``text_encoders/``): ``clip_l``, ``clip_g`` (Hugging Face CLIP keys, ``text_model.*``) and
  ``t5xxl`` (Hugging Face T5 encoder keys, ``shared.weight`` without the tied ``encoder.embed_tokens``);
- all-in-one checkpoints (``checkpoints/``): the transformer under ``model.diffusion_model.``, the VAE under
  ``first_stage_model.`` (SD3) or ``vae.`` (Flux), the text encoders under
  ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``.

Each part is built as the diffusers/transformers model it loads into, randomly initialised, and written through
the inverse of the key conversion (``modelfiles/convert_dit.py``); the tests check the written files against
diffusers' own converters. Sizes follow the conventions loaders rely on: an MMDiT of depth d is 64 x d wide, a
Flux transformer has 128 channels per head, a VAE has 4 levels; the two CLIPs have different widths (CLIP-G the
wider), and T5's width is the transformer's context width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tui_diffusion.pipeline.checkpoint_writer import vae_to_original

#: the dtypes a file may be written in (fp8 as ComfyUI's fp8 checkpoints store it)
DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
SD3_MODEL = "model.diffusion_model."
TEXT_PREFIX = "text_encoders.{}.transformer."


@dataclass(frozen=True)
class TinyText:
    """The text encoders SD3 and Flux share (CLIP-L, CLIP-G, T5-XXL), small."""

    clip_l_width: int = 32
    clip_g_width: int = 64
    clip_layers: int = 2
    t5_width: int = 128
    t5_layers: int = 2
    t5_heads: int = 4
    t5_ff: int = 256


@dataclass(frozen=True)
class TinySD3:
    """A small MMDiT (SD3.5 medium's shape: qk norm and dual attention in the first blocks, when asked)."""

    depth: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 32
    qk_norm: bool = True
    dual_attention_layers: tuple[int, ...] = (0,)
    text: TinyText = TinyText()

    @property
    def hidden(self) -> int:
        return 64 * self.depth


@dataclass(frozen=True)
class TinyFlux:
    """A small Flux transformer (dev when ``guidance``; schnell without); one head of 128 channels keeps it
    about 1 M parameters."""

    heads: int = 1
    layers: int = 1
    single_layers: int = 1
    guidance: bool = True
    in_channels: int = 64
    out_channels: int = 64
    text: TinyText = TinyText()


@dataclass(frozen=True)
class TinyVae16:
    channels: tuple[int, ...] = (32, 32, 32, 32)
    layers: int = 1


SD3_VAE_FACTORS = (1.5305, 0.0609)
FLUX_VAE_FACTORS = (0.3611, 0.1159)


# -- building the diffusers/transformers models ----------------------------------------------------------------
def build_sd3_transformer(sizes: TinySD3 = TinySD3(), seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=sizes.in_channels, num_layers=sizes.depth,
        attention_head_dim=64, num_attention_heads=sizes.depth, joint_attention_dim=sizes.text.t5_width,
        caption_projection_dim=sizes.hidden, pooled_projection_dim=sizes.text.clip_l_width + sizes.text.clip_g_width,
        out_channels=16, pos_embed_max_size=sizes.pos_embed_max_size,
        dual_attention_layers=sizes.dual_attention_layers, qk_norm="rms_norm" if sizes.qk_norm else None,
    )
    _randomise_zero_init(model)
    return model.eval()


def build_flux_transformer(sizes: TinyFlux = TinyFlux(), seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=sizes.in_channels, out_channels=sizes.out_channels, num_layers=sizes.layers,
        num_single_layers=sizes.single_layers, attention_head_dim=128, num_attention_heads=sizes.heads,
        joint_attention_dim=sizes.text.t5_width, pooled_projection_dim=sizes.text.clip_l_width,
        guidance_embeds=sizes.guidance, axes_dims_rope=(16, 56, 56),
    )
    _randomise_zero_init(model)
    return model.eval()


def _randomise_zero_init(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers; random values there make every tensor matter in tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.uniform_(0.5, 1.5)


def build_vae16(factors: tuple[float, float], sizes: TinyVae16 = TinyVae16(), seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=sizes.channels,
        layers_per_block=sizes.layers, down_block_types=("DownEncoderBlock2D",) * len(sizes.channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.channels), norm_num_groups=32,
        scaling_factor=factors[0], shift_factor=factors[1], use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20.0)  # random init decodes to near grey; widen it
    return vae.eval()


def build_clip(width: int, layers: int, projection: bool, act: str, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=width * 4,
                            num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                            max_position_embeddings=77, hidden_act=act, projection_dim=width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def build_t5(sizes: TinyText = TinyText(), seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=sizes.t5_width, d_kv=sizes.t5_width // sizes.t5_heads,
                      d_ff=sizes.t5_ff, num_layers=sizes.t5_layers, num_heads=sizes.t5_heads,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                      layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def build_text_encoders(sizes: TinyText = TinyText(), seed: int = 0) -> dict[str, Any]:
    """CLIP-L (SD3/Flux read its unprojected pooled output), CLIP-G (with projection) and T5."""
    return {
        "clip_l": build_clip(sizes.clip_l_width, sizes.clip_layers, False, "quick_gelu", seed + 1),
        "clip_g": build_clip(sizes.clip_g_width, sizes.clip_layers, True, "gelu", seed + 2),
        "t5xxl": build_t5(sizes, seed + 3),
    }


# -- diffusers -> original keys --------------------------------------------------------------------------------
def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_to_original(state: dict[str, torch.Tensor], num_layers: int,
                    prefix: str = SD3_MODEL) -> dict[str, torch.Tensor]:
    """``SD3Transformer2DModel`` keys -> Stability's MMDiT keys (the inverse of ``convert_dit.sd3_to_diffusers``)."""
    s = state
    o: dict[str, torch.Tensor] = {
        "pos_embed": s["pos_embed.pos_embed"],
        "x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
        "context_embedder.weight": s["context_embedder.weight"], "context_embedder.bias": s["context_embedder.bias"],
        "final_layer.linear.weight": s["proj_out.weight"], "final_layer.linear.bias": s["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": _swap_halves(s["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(s["norm_out.linear.bias"]),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for i, j in ((1, 0), (2, 2)):
            for kind in ("weight", "bias"):
                o[f"{theirs}.mlp.{j}.{kind}"] = s[f"time_text_embed.{ours}.linear_{i}.{kind}"]
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for kind in ("weight", "bias"):
            o[f"{b}x_block.attn.qkv.{kind}"] = torch.cat([s[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            o[f"{b}context_block.attn.qkv.{kind}"] = torch.cat([s[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            o[f"{b}x_block.attn.proj.{kind}"] = s[f"{d}attn.to_out.0.{kind}"]
            o[f"{b}x_block.adaLN_modulation.1.{kind}"] = s[f"{d}norm1.linear.{kind}"]
            ctx = s[f"{d}norm1_context.linear.{kind}"]
            o[f"{b}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(ctx) if last else ctx
            o[f"{b}x_block.mlp.fc1.{kind}"] = s[f"{d}ff.net.0.proj.{kind}"]
            o[f"{b}x_block.mlp.fc2.{kind}"] = s[f"{d}ff.net.2.{kind}"]
            if not last:
                o[f"{b}context_block.attn.proj.{kind}"] = s[f"{d}attn.to_add_out.{kind}"]
                o[f"{b}context_block.mlp.fc1.{kind}"] = s[f"{d}ff_context.net.0.proj.{kind}"]
                o[f"{b}context_block.mlp.fc2.{kind}"] = s[f"{d}ff_context.net.2.{kind}"]
            if f"{d}attn2.to_q.{kind}" in s:
                o[f"{b}x_block.attn2.qkv.{kind}"] = torch.cat([s[f"{d}attn2.to_{x}.{kind}"] for x in "qkv"])
                o[f"{b}x_block.attn2.proj.{kind}"] = s[f"{d}attn2.to_out.0.{kind}"]
        for ours, theirs in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                             ("attn.norm_added_q", "context_block.attn.ln_q"),
                             ("attn.norm_added_k", "context_block.attn.ln_k"),
                             ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if f"{d}{ours}.weight" in s:
                o[f"{b}{theirs}.weight"] = s[f"{d}{ours}.weight"]
    return {prefix + k: v for k, v in o.items()}


_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_FLUX_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def flux_to_original(state: dict[str, torch.Tensor], num_layers: int, num_single_layers: int,
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """``FluxTransformer2DModel`` keys -> Black Forest Labs' keys (the inverse of ``convert_dit.flux_to_diffusers``)."""
    s = state
    o: dict[str, torch.Tensor] = {}
    embedders = [("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")]
    for kind in ("weight", "bias"):
        for ours, theirs in embedders:
            if f"time_text_embed.{ours}.linear_1.{kind}" in s:
                o[f"{theirs}.in_layer.{kind}"] = s[f"time_text_embed.{ours}.linear_1.{kind}"]
                o[f"{theirs}.out_layer.{kind}"] = s[f"time_text_embed.{ours}.linear_2.{kind}"]
        o[f"txt_in.{kind}"] = s[f"context_embedder.{kind}"]
        o[f"img_in.{kind}"] = s[f"x_embedder.{kind}"]
        o[f"final_layer.linear.{kind}"] = s[f"proj_out.{kind}"]
        o[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(s[f"norm_out.linear.{kind}"])
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            for ours, theirs in _FLUX_DOUBLE.items():
                o[f"{b}{theirs}.{kind}"] = s[f"{d}{ours}.{kind}"]
            o[f"{b}img_attn.qkv.{kind}"] = torch.cat([s[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            o[f"{b}txt_attn.qkv.{kind}"] = torch.cat([s[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
        for ours, theirs in _FLUX_NORMS.items():
            o[f"{b}{theirs}.scale"] = s[f"{d}{ours}.weight"]
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            o[f"{b}linear1.{kind}"] = torch.cat([s[f"{d}attn.to_q.{kind}"], s[f"{d}attn.to_k.{kind}"],
                                                 s[f"{d}attn.to_v.{kind}"], s[f"{d}proj_mlp.{kind}"]])
            o[f"{b}linear2.{kind}"] = s[f"{d}proj_out.{kind}"]
            o[f"{b}modulation.lin.{kind}"] = s[f"{d}norm.linear.{kind}"]
        o[f"{b}norm.query_norm.scale"] = s[f"{d}attn.norm_q.weight"]
        o[f"{b}norm.key_norm.scale"] = s[f"{d}attn.norm_k.weight"]
    return {prefix + k: v for k, v in o.items()}


def vae_state_to_original(state: dict[str, torch.Tensor], levels: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A VAE's diffusers tensors (``levels`` resolutions) in the LDM layout under ``prefix`` (``vae.`` in Flux's
    files, ``first_stage_model.`` in the others, none in ``vae/``)."""
    sd = vae_to_original(state, levels)
    return {prefix + k[len("first_stage_model."):]: v for k, v in sd.items()}


def vae16_to_original(vae: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """A 16-channel VAE in the LDM layout (no quant convolutions), under ``prefix``."""
    return vae_state_to_original(vae.state_dict(), len(vae.config.block_out_channels), prefix)


def clip_file_keys(model: Any) -> dict[str, torch.Tensor]:
    """A CLIP text model as ComfyUI's ``text_encoders/clip_*.safetensors`` hold it (``text_model.*`` keys)."""
    out = {}
    for k, v in model.state_dict().items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k  # transformers 5 flattened CLIPTextModel
        if not k.endswith("position_ids"):
            out[k] = v
    return out


def t5_file_keys(model: Any) -> dict[str, torch.Tensor]:
    """A T5 encoder as ``t5xxl_*.safetensors`` holds it: ``shared.weight``, no tied ``encoder.embed_tokens``."""
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    out.setdefault("shared.weight", sd["encoder.embed_tokens.weight"])
    return out


def text_encoder_keys(models: dict[str, Any], names: tuple[str, ...], prefix: str = TEXT_PREFIX) -> dict[str, Any]:
    """The text encoders ``names`` (``clip_l``, ``clip_g``, ``t5xxl``) by their published keys, each under
    ``prefix`` formatted with its name (an all-in-one checkpoint's ``text_encoders.<name>.transformer.``)."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        keys = t5_file_keys(models[name]) if name == "t5xxl" else clip_file_keys(models[name])
        out.update({prefix.format(name) + k: v for k, v in keys.items()})
    return out


# -- writing ---------------------------------------------------------------------------------------------------
def save(sd: dict[str, torch.Tensor], path: str | os.PathLike[str], dtype: str | torch.dtype = "fp32") -> Path:
    """Write tensors as safetensors, floating ones in ``dtype`` (a DTYPES name or a torch dtype); atomically."""
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    sd = {k: (v.detach().to(target) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_sd3_transformer(path: str | os.PathLike[str], sizes: TinySD3 = TinySD3(), seed: int = 0,
                          dtype: str | torch.dtype = "fp32", prefix: str = SD3_MODEL) -> Path:
    """An SD3.5 transformer file as Stability publishes it (``model.diffusion_model.`` keys)."""
    model = build_sd3_transformer(sizes, seed)
    return save(sd3_to_original(model.state_dict(), sizes.depth, prefix), path, dtype)


def write_flux_transformer(path: str | os.PathLike[str], sizes: TinyFlux = TinyFlux(), seed: int = 0,
                           dtype: str | torch.dtype = "fp32", prefix: str = "") -> Path:
    """A Flux transformer file as Black Forest Labs publishes it (no prefix)."""
    model = build_flux_transformer(sizes, seed)
    return save(flux_to_original(model.state_dict(), sizes.layers, sizes.single_layers, prefix), path, dtype)


def write_vae16(path: str | os.PathLike[str], flux: bool, sizes: TinyVae16 = TinyVae16(), seed: int = 0,
                dtype: str | torch.dtype = "fp32") -> Path:
    """A 16-channel VAE file (Flux's ``ae.safetensors`` or SD3's VAE), LDM keys without a prefix."""
    vae = build_vae16(FLUX_VAE_FACTORS if flux else SD3_VAE_FACTORS, sizes, seed)
    return save(vae16_to_original(vae), path, dtype)


def write_text_encoders(folder: str | os.PathLike[str], sizes: TinyText = TinyText(), seed: int = 0,
                        dtype: str | torch.dtype = "fp32") -> dict[str, Path]:
    """``clip_l.safetensors``, ``clip_g.safetensors`` and ``t5xxl_fp16.safetensors`` as ComfyUI's
    ``text_encoders/`` folder holds them (the file names its templates expect)."""
    models = build_text_encoders(sizes, seed)
    folder = Path(folder)
    names = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
    return {name: save(text_encoder_keys(models, (name,), prefix=""), folder / names[name], dtype)
            for name in names}


def write_sd3_checkpoint(path: str | os.PathLike[str], sizes: TinySD3 = TinySD3(), seed: int = 0,
                         dtype: str | torch.dtype = "fp32", t5: bool = True) -> Path:
    """An all-in-one SD3.5 checkpoint: transformer, VAE (``first_stage_model.``) and CLIP-L, CLIP-G and (unless
    ``t5`` is False, as in ``sd3_medium_incl_clips``) T5 under ``text_encoders.*.transformer.``."""
    sd = sd3_to_original(build_sd3_transformer(sizes, seed).state_dict(), sizes.depth)
    sd.update(vae16_to_original(build_vae16(SD3_VAE_FACTORS, seed=seed), "first_stage_model."))
    names = ("clip_l", "clip_g", "t5xxl") if t5 else ("clip_l", "clip_g")
    sd.update(text_encoder_keys(build_text_encoders(sizes.text, seed), names))
    return save(sd, path, dtype)


def write_flux_checkpoint(path: str | os.PathLike[str], sizes: TinyFlux = TinyFlux(), seed: int = 0,
                          dtype: str | torch.dtype = "fp32") -> Path:
    """An all-in-one Flux checkpoint (as Comfy-Org's ``flux1-dev-fp8.safetensors``): the transformer under
    ``model.diffusion_model.``, the VAE under ``vae.``, CLIP-L and T5 under ``text_encoders.*.transformer.``."""
    model = build_flux_transformer(sizes, seed)
    sd = flux_to_original(model.state_dict(), sizes.layers, sizes.single_layers, SD3_MODEL)
    sd.update(vae16_to_original(build_vae16(FLUX_VAE_FACTORS, seed=seed), "vae."))
    sd.update(text_encoder_keys(build_text_encoders(sizes.text, seed), ("clip_l", "t5xxl")))
    return save(sd, path, dtype)

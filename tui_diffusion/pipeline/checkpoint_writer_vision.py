"""Write random-weight image encoders and style models in the layouts they are published in (tests and demos).

- CLIP vision towers (``clip_vision/``): transformers' ``CLIPVisionModelWithProjection`` keys with the
  ``vision_model.`` level (``clip_vision_g.safetensors``, ComfyUI's ViT-H/ViT-L files), without it, or open_clip's
  ``visual.*`` layout;
- SigLIP towers: ``SiglipVisionModel`` keys under ``vision_model.`` (``sigclip_vision_patch14_384.safetensors``);
- Flux Redux (``style_models/flux1-redux-dev.safetensors``): ``redux_up``/``redux_down``.

Each is built as the transformers model it loads into, with the head count ``clip_vision.heads_for`` assumes, so
the loader's configuration from shapes gives back the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.pipeline.checkpoint_writer_dit import save
from tui_diffusion.pipeline.clip_vision import heads_for, vision_transformer


@dataclass(frozen=True)
class TinyVision:
    """A small ViT: 28 px images in 7 px patches (16 tokens, plus a class token for CLIP)."""

    width: int = 32
    layers: int = 3
    intermediate: int = 64
    patch: int = 7
    image_size: int = 28
    projection_dim: int = 24


def build_clip_vision(sizes: TinyVision = TinyVision(), seed: int = 0, act: str = "gelu") -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=sizes.width, intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
        num_attention_heads=heads_for(sizes.width), image_size=sizes.image_size, patch_size=sizes.patch,
        projection_dim=sizes.projection_dim, hidden_act=act, layer_norm_eps=1e-5)).eval()


def build_siglip_vision(sizes: TinyVision = TinyVision(), seed: int = 0) -> Any:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(
        hidden_size=sizes.width, intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
        num_attention_heads=heads_for(sizes.width), image_size=sizes.image_size, patch_size=sizes.patch,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)).eval()


def _tower(model: Any) -> dict[str, torch.Tensor]:
    """The vision transformer's own keys (no ``vision_model.`` level), as transformers names them."""
    return {k: v for k, v in vision_transformer(model).state_dict().items() if not k.endswith("position_ids")}


def clip_vision_keys(model: Any, layout: str = "hf", prefix: str = "") -> dict[str, torch.Tensor]:
    """A CLIP vision model's tensors in a file layout: "hf" (``vision_model.*`` and ``visual_projection``),
    "hf-bare" (no ``vision_model.`` level) or "openclip" (``visual.*``, as open_clip and unCLIP checkpoints)."""
    tower = _tower(model)
    projection = model.visual_projection.weight.detach()
    if layout == "hf":
        out = {f"{prefix}vision_model.{k}": v for k, v in tower.items()}
        out[f"{prefix}visual_projection.weight"] = projection
        return out
    if layout == "hf-bare":
        return {**{prefix + k: v for k, v in tower.items()}, prefix + "visual_projection.weight": projection}
    if layout != "openclip":
        raise ValueError(f"unknown layout {layout!r}")
    p = prefix + "visual."
    out = {
        p + "class_embedding": tower["embeddings.class_embedding"],
        p + "conv1.weight": tower["embeddings.patch_embedding.weight"],
        p + "positional_embedding": tower["embeddings.position_embedding.weight"],
        p + "ln_pre.weight": tower["pre_layrnorm.weight"], p + "ln_pre.bias": tower["pre_layrnorm.bias"],
        p + "ln_post.weight": tower["post_layernorm.weight"], p + "ln_post.bias": tower["post_layernorm.bias"],
        p + "proj": projection.t().contiguous(),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([tower[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = tower[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = tower[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = tower[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = tower[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = tower[f"{src}mlp.fc2.{kind}"]
    return out


def siglip_keys(model: Any, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """A SigLIP vision model's tensors as ComfyUI's ``sigclip_vision_patch14_384.safetensors`` holds them."""
    return {prefix + k: v for k, v in _tower(model).items()}


def write_clip_vision(path: str | os.PathLike[str], sizes: TinyVision = TinyVision(), seed: int = 0,
                      layout: str = "hf", act: str = "gelu") -> Path:
    return save(clip_vision_keys(build_clip_vision(sizes, seed, act), layout), path)


def write_siglip_vision(path: str | os.PathLike[str], sizes: TinyVision = TinyVision(), seed: int = 0) -> Path:
    return save(siglip_keys(build_siglip_vision(sizes, seed)), path)


def redux_keys(vision_width: int, text_width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flux Redux's projector: ``redux_up`` (vision width -> 3x text width) and ``redux_down`` (-> text width)."""
    from tui_diffusion.pipeline.clip_vision import ReduxProjector

    torch.manual_seed(seed)
    module = ReduxProjector(vision_width, 3 * text_width, text_width)
    return {k: v.detach() for k, v in module.state_dict().items()}


def write_redux(path: str | os.PathLike[str], vision_width: int = TinyVision().width, text_width: int = 128,
                seed: int = 0) -> Path:
    return save(redux_keys(vision_width, text_width, seed), path)


def write_sd21_unclip_checkpoint(path: str | os.PathLike[str], vision: TinyVision = TinyVision(), seed: int = 0,
                                 dtype: torch.dtype = torch.float32) -> Path:
    """An SD2.1 unCLIP checkpoint (ViT-H's layout, small): SD2.x's file with a projection class embedding taking
    twice the image embedding's width, the image encoder under ``embedder.model.visual.`` (open_clip) and the
    noise augmentor's ``data_mean``/``data_std``."""
    from tui_diffusion.pipeline.checkpoint_writer import (
        TinySD2,
        _save,
        _unet,
        build_sd2_models,
        ddpm_schedule_tensors,
        openclip_from_hf,
        unet_to_original,
        vae_to_original,
    )

    sizes = TinySD2()
    _, vae, text = build_sd2_models(sizes, seed)
    torch.manual_seed(seed + 2)
    unet = _unet(sizes.unet_channels, sizes.unet_attention, sizes.layers_per_block, sizes.text_width,
                 sample_size=96, attention_head_dim=tuple(max(1, c // 64) for c in sizes.unet_channels),
                 use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
                 projection_class_embeddings_input_dim=2 * vision.projection_dim).eval()
    # the class embedding sits where SDXL's added embedding does (label_emb.0.*)
    state = {k.replace("class_embedding.", "add_embedding.", 1): v for k, v in unet.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(state, sizes.layers_per_block))
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update(openclip_from_hf(text, "cond_stage_model.model."))
    sd.update(ddpm_schedule_tensors())
    sd.update(clip_vision_keys(build_clip_vision(vision, seed + 3), "openclip", prefix="embedder.model."))
    gen = torch.Generator().manual_seed(seed + 4)
    sd["noise_augmentor.data_mean"] = torch.randn(1, vision.projection_dim, generator=gen) * 0.1
    sd["noise_augmentor.data_std"] = torch.rand(1, vision.projection_dim, generator=gen) + 0.5
    return _save(sd, Path(path), dtype)


def write_t2i_style(path: str | os.PathLike[str], vision_width: int = TinyVision().width, text_width: int = 32,
                    tokens: int = 8, layers: int = 3, seed: int = 0) -> Path:
    """An SD1.x T2I-Adapter style model (``coadapter-style``'s keys: ``style_embedding``, ``transformer_layes.*``,
    ``ln_pre``/``ln_post``, ``proj``), random."""
    from tui_diffusion.pipeline.clip_vision import T2IStyleAdapter

    torch.manual_seed(seed)
    module = T2IStyleAdapter(vision_width, text_width, tokens, layers)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == vision_width else 0.0))
    return save({k: v.detach() for k, v in module.state_dict().items()}, path)

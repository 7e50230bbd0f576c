"""Write random-weight checkpoints in the original single-file (CompVis/LDM) layout.

The demo command and the tests use this writer, so the whole program can be tried with no model
and no network. The key mapping is the inverse of the one diffusers' single-file loader applies
(see the layout notes in the README); loading a written file back with ``from_single_file``
must return every tensor unchanged, which the tests check.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TinySD1:
    """Sizes of a small SD1.x-architecture model that follows the family's conventions."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_attention: tuple[bool, ...] = (True, False)
    layers_per_block: int = 1
    transformer_depth: int = 1
    text_width: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers: int = 1
    #: 9 for an inpainting UNet (latent + mask + masked-image latent)
    in_channels: int = 4


FULL_SD15 = TinySD1(
    unet_channels=(320, 640, 1280, 1280), unet_attention=(True, True, True, False), layers_per_block=2,
    text_width=768, text_layers=12, vae_channels=(128, 256, 512, 512), vae_layers=2,
)


def _unet(channels: tuple[int, ...], attention: tuple[bool, ...], layers: int, cross_attention_dim: int,
          **options: Any) -> Any:
    """A diffusers UNet whose levels have cross-attention where ``attention`` says (down and mirrored up)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=options.pop("in_channels", 4), out_channels=4, block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=cross_attention_dim, norm_num_groups=32, **options,
    )


def build_sd1_models(sizes: TinySD1, seed: int = 0):
    """Randomly initialised diffusers/transformers SD1.x components of the given sizes."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = _unet(sizes.unet_channels, sizes.unet_attention, sizes.layers_per_block, sizes.text_width,
                 sample_size=64, in_channels=sizes.in_channels, attention_head_dim=8,
                 transformer_layers_per_block=sizes.transformer_depth)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=sizes.vae_channels,
        layers_per_block=sizes.vae_layers,
        down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels),
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408,
        hidden_size=sizes.text_width,
        intermediate_size=sizes.text_width * 4,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=max(1, sizes.text_width // 64),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=sizes.text_width,
    ))
    with torch.no_grad():
        # random init leaves the VAE's output near zero; widen it so demo images show noise, not grey
        vae.decoder.conv_out.weight.mul_(20.0)
    return unet.eval(), vae.eval(), text.eval()


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_original_key(key: str, layers: int) -> str:
    parts = key.split(".")
    if parts[0] == "conv_in":
        return "input_blocks.0.0." + ".".join(parts[1:])
    if parts[0] == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
    if parts[0] == "conv_norm_out":
        return "out.0." + ".".join(parts[1:])
    if parts[0] == "add_embedding":  # SDXL's pooled-text and size embedding
        return {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + ".".join(parts[2:])
    if parts[0] == "conv_out":
        return "out.2." + ".".join(parts[1:])

    def resnet(rest: list[str]) -> str:
        return _RESNET[rest[0]] + "." + ".".join(rest[1:])

    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"input_blocks.{1 + b * (layers + 1) + j}.0." + resnet(rest)
        if kind == "attentions":
            return f"input_blocks.{1 + b * (layers + 1) + j}.1." + ".".join(rest)
        return f"input_blocks.{(b + 1) * (layers + 1)}.0.op." + ".".join(rest[1:])  # downsamplers.0.conv.*
    if parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"output_blocks.{b * (layers + 1) + j}.0." + resnet(rest)
        if kind == "attentions":
            return f"output_blocks.{b * (layers + 1) + j}.1." + ".".join(rest)
        return None  # upsamplers: placed by the caller, which knows whether the level has attention
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * j}." + resnet(rest)
        return "middle_block.1." + ".".join(rest)
    raise KeyError(key)


def unet_to_original(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    attn_levels = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    for key, value in state.items():
        new = unet_original_key(key, layers)
        if new is None:  # up_blocks.b.upsamplers.0.conv.*
            b = int(key.split(".")[1])
            slot = 2 if b in attn_levels else 1
            new = f"output_blocks.{b * (layers + 1) + layers}.{slot}." + ".".join(key.split(".")[4:])
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_original(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            level = i if side == "encoder" else n_levels - 1 - i
            group = "down" if side == "encoder" else "up"
            if kind == "resnets":
                rest = [("nin_shortcut" if p == "conv_shortcut" else p) for p in parts[5:]]
                new = f"{side}.{group}.{level}.block.{parts[4]}." + ".".join(rest)
            else:  # downsamplers.0 / upsamplers.0
                sampler = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{group}.{level}.{sampler}." + ".".join(parts[5:])
        elif side in ("encoder", "decoder") and parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = [("nin_shortcut" if p == "conv_shortcut" else p) for p in parts[4:]]
                new = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(rest)
            else:
                name = _VAE_ATTN[parts[4]]
                new = f"{side}.mid.attn_1.{name}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # original stores 1x1 convolutions
        elif side in ("encoder", "decoder") and parts[1] == "conv_norm_out":
            new = f"{side}.norm_out." + ".".join(parts[2:])
        else:
            new = key
        out["first_stage_model." + new] = value
    return out


def ddpm_schedule_tensors(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, torch.Tensor]:
    """The DDPM buffers real SD1.x files carry (no model uses them; loaders must ignore them)."""
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1 - prev) / (1 - acp)
    t = {
        "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": acp.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - acp).log(), "sqrt_recip_alphas_cumprod": (1 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / acp - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - acp),
        "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - acp),
    }
    return {k: v.float() for k, v in t.items()}


def sd1_state_dict(unet, vae, text, layers: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(unet.state_dict(), layers))
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    for k, v in _hf_text_keys(text).items():
        sd["cond_stage_model.transformer." + k] = v
    sd.setdefault("cond_stage_model.transformer.text_model.embeddings.position_ids",
                  torch.arange(text.config.max_position_embeddings, dtype=torch.int64)[None])
    sd.update(ddpm_schedule_tensors())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return sd


def write_sd1_checkpoint(
    path: str | os.PathLike[str], sizes: TinySD1 = TinySD1(), seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight SD1.x checkpoint in the original layout; atomically."""
    unet, vae, text = build_sd1_models(sizes, seed)
    return _save(sd1_state_dict(unet, vae, text, sizes.layers_per_block), Path(path), dtype)


@dataclass(frozen=True)
class TinySDXL:
    """Sizes of a small SDXL-architecture model; the two text encoders differ in width, as in SDXL."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_attention: tuple[bool, ...] = (False, True)
    layers_per_block: int = 1
    transformer_depth: tuple[int, ...] = (1, 2)
    clip_l_width: int = 64
    clip_l_layers: int = 2
    clip_g_width: int = 128
    clip_g_layers: int = 2
    time_embed_dim: int = 8
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers: int = 1


def _sdxl_unet(sizes: TinySDXL, cross_attention_dim: int, size_numbers: int) -> Any:
    """SDXL's UNet: pooled text plus ``size_numbers`` embedded numbers (6 for the base, 5 for the refiner)."""
    return _unet(sizes.unet_channels, sizes.unet_attention, sizes.layers_per_block, cross_attention_dim,
                 sample_size=128, attention_head_dim=tuple(max(1, c // 64) for c in sizes.unet_channels),
                 transformer_layers_per_block=sizes.transformer_depth, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=sizes.time_embed_dim,
                 projection_class_embeddings_input_dim=size_numbers * sizes.time_embed_dim + sizes.clip_g_width)


def build_sdxl_models(sizes: TinySDXL, seed: int = 0):
    """Randomly initialised SDXL components: UNet, VAE, CLIP-L and OpenCLIP-bigG-style text encoders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _sdxl_unet(sizes, sizes.clip_l_width + sizes.clip_g_width, size_numbers=6)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=sizes.vae_channels,
        layers_per_block=sizes.vae_layers, down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels), norm_num_groups=32, scaling_factor=0.13025,
    )
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20.0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.clip_l_width, intermediate_size=sizes.clip_l_width * 4,
        num_hidden_layers=sizes.clip_l_layers, num_attention_heads=max(1, sizes.clip_l_width // 64),
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=sizes.clip_l_width))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.clip_g_width, intermediate_size=sizes.clip_g_width * 4,
        num_hidden_layers=sizes.clip_g_layers, num_attention_heads=max(1, sizes.clip_g_width // 64),
        max_position_embeddings=77, hidden_act="gelu", projection_dim=sizes.clip_g_width))
    return unet.eval(), vae.eval(), text.eval(), text_2.eval()


def _hf_text_keys(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's state with the "text_model." level (transformers 5 dropped it from CLIPTextModel)."""
    out = {}
    for k, v in module.state_dict().items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        out[k] = v
    return out


def openclip_from_hf(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text model in OpenCLIP's layout (SD2 ``cond_stage_model.model.*``, SDXL bigG)."""
    sd = _hf_text_keys(module)
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    layers = module.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()  # OpenCLIP: x @ proj
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def sdxl_state_dict(unet, vae, text, text_2, layers: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(unet.state_dict(), layers))
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    for k, v in _hf_text_keys(text).items():
        sd["conditioner.embedders.0.transformer." + k] = v
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(openclip_from_hf(text_2, "conditioner.embedders.1.model."))
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_sdxl_refiner_checkpoint(path: str | os.PathLike[str], sizes: TinySDXL = TinySDXL(), seed: int = 0,
                                  dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight SDXL refiner: bigG text encoder only, five size/score numbers."""

    _, vae, _, text_2 = build_sdxl_models(sizes, seed)
    torch.manual_seed(seed + 7)
    unet = _sdxl_unet(sizes, sizes.clip_g_width, size_numbers=5).eval()
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(unet.state_dict(), sizes.layers_per_block))
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update(openclip_from_hf(text_2, "conditioner.embedders.0.model."))
    return _save(sd, Path(path), dtype)


def write_sdxl_checkpoint(path: str | os.PathLike[str], sizes: TinySDXL = TinySDXL(), seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight SDXL base checkpoint in the original (SGM) single-file layout."""
    unet, vae, text, text_2 = build_sdxl_models(sizes, seed)
    return _save(sdxl_state_dict(unet, vae, text, text_2, sizes.layers_per_block), Path(path), dtype)


@dataclass(frozen=True)
class TinySD2:
    """Sizes of a small SD2.x-architecture model: four levels of two layers, as SD2's UNet has, so the
    norm ComfyUI inspects to tell v-prediction apart exists."""

    unet_channels: tuple[int, ...] = (64, 64, 64, 64)
    unet_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    text_width: int = 64
    text_layers: int = 3
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers: int = 1
    #: 9 for SD2's inpainting UNet (latent + mask + masked-image latent)
    in_channels: int = 4


def build_sd2_models(sizes: TinySD2, seed: int = 0, v_prediction: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel

    _, vae, _ = build_sd1_models(TinySD1(vae_channels=sizes.vae_channels, vae_layers=sizes.vae_layers), seed)
    torch.manual_seed(seed + 1)
    unet = _unet(sizes.unet_channels, sizes.unet_attention, sizes.layers_per_block, sizes.text_width,
                 sample_size=96, attention_head_dim=tuple(max(1, c // 64) for c in sizes.unet_channels),
                 use_linear_projection=True, upcast_attention=True, in_channels=sizes.in_channels)
    if v_prediction:  # what v-objective training does to the norm ComfyUI's detection reads
        with torch.no_grad():
            unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias.normal_(0, 0.3)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.text_width, intermediate_size=sizes.text_width * 4,
        num_hidden_layers=sizes.text_layers, num_attention_heads=max(1, sizes.text_width // 64),
        max_position_embeddings=77, hidden_act="gelu", projection_dim=sizes.text_width))
    return unet.eval(), vae.eval(), text.eval()


def write_sd2_checkpoint(path: str | os.PathLike[str], sizes: TinySD2 = TinySD2(), seed: int = 0,
                         v_prediction: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight SD2.x checkpoint in the original layout (OpenCLIP text tower)."""
    unet, vae, text = build_sd2_models(sizes, seed, v_prediction)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(unet.state_dict(), sizes.layers_per_block))
    sd.update(vae_to_original(vae.state_dict(), len(vae.config.block_out_channels)))
    sd.update(openclip_from_hf(text, "cond_stage_model.model."))
    sd.update(ddpm_schedule_tensors())
    return _save(sd, Path(path), dtype)


def write_kohya_lora(path: str | os.PathLike[str], unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
                     rank: int = 4, seed: int = 0, original_names: bool = False, scale: float = 0.05) -> Path:
    """A random LoRA in the kohya/A1111 layout for the attention projections of a UNet and its text encoders.

    ``original_names`` names UNet layers the way kohya's SDXL files do (``input_blocks_4_1_...``) instead of
    by diffusers' module paths.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def add(key: str, module: torch.nn.Linear) -> None:
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
        sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
        sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)

    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            if original_names:
                name = unet_original_key(name + ".weight", unet.config.layers_per_block).removesuffix(".weight")
            add("lora_unet_" + name.replace(".", "_"), module)
    prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, encoder in zip(prefixes, text_encoders, strict=False):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and re.search(r"self_attn\.(q_proj|v_proj)$", name):
                full = name if name.startswith("text_model.") else "text_model." + name
                add(f"{prefix}_" + full.replace(".", "_"), module)
    return _save(sd, Path(path), torch.float32)


def write_sd1_diffusers_folder(path: str | os.PathLike[str], sizes: TinySD1 = TinySD1(), seed: int = 0) -> Path:
    """The same random model as a diffusers folder (for the folder-in-checkpoints/ path)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from tui_diffusion.modelfiles.configs import package_config_dir

    unet, vae, text = build_sd1_models(sizes, seed)
    tok_dir = package_config_dir("clip_tokenizer")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>")
    scheduler = PNDMScheduler.from_pretrained(str(package_config_dir("sd15")), subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)

"""The diffusers configuration a single-file checkpoint needs, read from its tensor shapes.

diffusers' ``from_single_file(..., config=<folder>)`` builds each model from a config folder
and only then copies the weights in, so the folder must describe the file's real sizes. The
shipped family folders (``tui_diffusion/configs/``) give what shapes cannot tell; the shapes
give the rest. Torch-free: works from the safetensors header alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from tui_diffusion.families.sd1 import SD1_LATENT, SD1_TEXT, UNET, VAE
from tui_diffusion.families.sd2 import SD2_TEXT
from tui_diffusion.families.sdxl import SDXL_LATENT, SDXL_REFINER_TEXT_G, SDXL_TEXT_G, SDXL_TEXT_L
from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo

CONFIG_PACKAGE = "tui_diffusion.configs"
#: The latent scale diffusers' pipelines read from the VAE config. The models here never use it (the
#: family's latent format scales latents in the sampler); it keeps the built pipelines true to diffusers'.
#: where a VAE's tensors sit in a single file: SD checkpoints, Flux all-in-one checkpoints
VAE_PREFIXES = (VAE, "vae.")
SD_VAE_SCALING = SD1_LATENT.scale_factor
SDXL_VAE_SCALING = SDXL_LATENT.scale_factor
#: SD1.x/SD2.x pipelines without a safety checker or feature extractor (never loaded here)
SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def package_config_dir(name: str) -> Path:
    return Path(str(resources.files(CONFIG_PACKAGE).joinpath(name)))


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _count(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    return len(found)


def _shape(h: dict[str, TensorInfo], key: str, file: str) -> tuple[int, ...]:
    try:
        return h[key].shape
    except KeyError:
        raise CheckpointError(f"{file}: incomplete checkpoint: tensor {key!r} is missing") from None


def unet_config(h: dict[str, TensorInfo], template: dict[str, Any], file: str, pooled_width: int | None = None,
                size_numbers: int = 6, heads_per_level: int | None = None) -> dict[str, Any]:
    """A UNet2DConditionModel config from an LDM-layout UNet's shapes. ``heads_per_level``: SD1.x's convention
    of a fixed head count (8); otherwise 64 channels per head. ``size_numbers``: how many size numbers follow
    the pooled text in an SDXL UNet's added embedding (6; the refiner 5)."""
    keys = [k for k in h if k.startswith(UNET)]
    p = UNET
    conv_in = _shape(h, p + "input_blocks.0.0.weight", file)
    op_rx = re.compile(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    ops = sorted(int(m.group(1)) for k in keys if (m := op_rx.match(k)))
    n_inputs = _count(keys, re.escape(p) + r"input_blocks\.(\d+)\.")
    layers = ops[0] - 1 if ops else n_inputs - 1
    n_levels = len(ops) + 1
    channels, has_attn, depth = [], [], []
    for b in range(n_levels):
        idx = 1 + b * (layers + 1)
        channels.append(_shape(h, f"{p}input_blocks.{idx}.0.in_layers.2.weight", file)[0])
        attn = f"{p}input_blocks.{idx}.1."
        has_attn.append(any(k.startswith(attn) for k in keys))
        depth.append(_count(keys, re.escape(attn) + r"transformer_blocks\.(\d+)\."))
    mid_depth = _count(keys, re.escape(p + "middle_block.1.") + r"transformer_blocks\.(\d+)\.") or 1
    # levels without attention have no depth of their own; give them the middle block's
    depth = [d or mid_depth for d in depth]
    to_k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    cfg = dict(template)
    cfg.update(
        in_channels=conv_in[1],
        out_channels=_shape(h, p + "out.2.weight", file)[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        cross_attention_dim=h[to_k].shape[1] if to_k else template.get("cross_attention_dim", 768),
        use_linear_projection=bool(proj_in and len(h[proj_in].shape) == 2),
        transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
        norm_num_groups=32,
    )
    if mid_depth != depth[-1]:
        # diffusers' mid block takes the last level's depth; say so instead of loading wrong weights
        raise CheckpointError(f"{file}: unsupported UNet: middle block depth {mid_depth} differs from the last level's")
    if heads_per_level is not None:
        cfg["attention_head_dim"] = heads_per_level
    else:
        cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]  # 64 channels per head
    label = h.get(p + "label_emb.0.0.weight")
    if label is not None:  # SDXL: pooled text + size numbers (6; the refiner 5), each embedded alike
        if pooled_width is None:
            raise CheckpointError(f"{file}: a size-conditioned UNet without a pooled text projection")
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=label.shape[1],
                   addition_time_embed_dim=(label.shape[1] - pooled_width) // size_numbers)
    return cfg


def vae_config(h: dict[str, TensorInfo], template: dict[str, Any], file: str, prefix: str = VAE,
               scaling: float = SD_VAE_SCALING) -> dict[str, Any]:
    keys = [k for k in h if k.startswith(prefix)]
    p = prefix
    n_levels = _count(keys, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if n_levels == 0:
        raise CheckpointError(f"{file}: incomplete checkpoint: no VAE ('{prefix}encoder.*') tensors")
    channels = [_shape(h, f"{p}encoder.down.{i}.block.0.conv1.weight", file)[0] for i in range(n_levels)]
    cfg = dict(template)
    cfg.update(
        in_channels=_shape(h, p + "encoder.conv_in.weight", file)[1],
        out_channels=_shape(h, p + "decoder.conv_out.weight", file)[0],
        latent_channels=_shape(h, p + "decoder.conv_in.weight", file)[1],
        use_quant_conv=p + "quant_conv.weight" in h,
        use_post_quant_conv=p + "post_quant_conv.weight" in h,
        block_out_channels=channels,
        layers_per_block=_count(keys, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * n_levels,
        up_block_types=["UpDecoderBlock2D"] * n_levels,
        norm_num_groups=32,
        sample_size=template.get("sample_size", 512),
        scaling_factor=scaling,
    )
    return cfg


def _text_config(h: dict[str, TensorInfo], template: dict[str, Any], file: str, tokens: str, positions: str,
                 layer_pattern: str, first_fc: str) -> dict[str, Any]:
    """An HF CLIP text config from the shapes of a text tower, whichever key layout it uses."""
    vocab, hidden = _shape(h, tokens, file)
    if vocab != 49408:
        raise CheckpointError(f"{file}: text encoder has {vocab} tokens; CLIP's tokenizer needs 49408")
    cfg = dict(template)
    cfg.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count(list(h), layer_pattern),
        intermediate_size=_shape(h, first_fc, file)[0],
        max_position_embeddings=_shape(h, positions, file)[0],
        num_attention_heads=max(1, hidden // 64),  # convention: 64 channels per head
    )
    return cfg


def clip_config(h: dict[str, TensorInfo], prefix: str, template: dict[str, Any], file: str) -> dict[str, Any]:
    p = prefix + "text_model."
    cfg = _text_config(h, template, file, p + "embeddings.token_embedding.weight",
                       p + "embeddings.position_embedding.weight", re.escape(p) + r"encoder\.layers\.(\d+)\.",
                       p + "encoder.layers.0.mlp.fc1.weight")
    cfg["projection_dim"] = cfg["hidden_size"]
    return cfg


def openclip_config(h: dict[str, TensorInfo], prefix: str, template: dict[str, Any], file: str) -> dict[str, Any]:
    """HF CLIPTextModel(WithProjection) config of an OpenCLIP text tower (SD2, SDXL bigG)."""
    cfg = _text_config(h, template, file, prefix + "token_embedding.weight", prefix + "positional_embedding",
                       re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.",
                       prefix + "transformer.resblocks.0.mlp.c_fc.weight")
    if prefix + "text_projection" in h:
        cfg["projection_dim"] = h[prefix + "text_projection"].shape[1]
    cfg.pop("torch_dtype", None)  # the shipped SDXL configs say float16; the caller chooses the dtype
    cfg.pop("dtype", None)
    return cfg


def sdxl_configs(h: dict[str, TensorInfo], file: str) -> dict[str, dict[str, Any]]:
    base = package_config_dir("sdxl-base")
    text = clip_config(h, SDXL_TEXT_L, _load_json(base / "text_encoder" / "config.json"), file)
    text.pop("torch_dtype", None)
    text_2 = openclip_config(h, SDXL_TEXT_G, _load_json(base / "text_encoder_2" / "config.json"), file)
    files = {
        "model_index.json": _load_json(base / "model_index.json"),
        "unet/config.json": unet_config(h, _load_json(base / "unet" / "config.json"), file,
                                        pooled_width=text_2["projection_dim"]),
        "vae/config.json": vae_config(h, _load_json(base / "vae" / "config.json"), file, scaling=SDXL_VAE_SCALING),
        "text_encoder/config.json": text,
        "text_encoder_2/config.json": text_2,
        "scheduler/scheduler_config.json": _load_json(base / "scheduler" / "scheduler_config.json"),
    }
    for tok in ("tokenizer", "tokenizer_2"):
        files[f"{tok}/tokenizer_config.json"] = _load_json(base / tok / "tokenizer_config.json")
        files[f"{tok}/special_tokens_map.json"] = _load_json(base / tok / "special_tokens_map.json")
    return files


def sd2_configs(h: dict[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
    """SD2.x: OpenCLIP ViT-H text tower with all of its layers (the penultimate is read, as ComfyUI does)."""
    base = package_config_dir("sd21-v")
    text = openclip_config(h, SD2_TEXT, _load_json(base / "text_encoder" / "config.json"), file)
    text["projection_dim"] = text["hidden_size"]
    tok = _load_json(base / "tokenizer" / "tokenizer_config.json")
    tok["model_max_length"] = text["max_position_embeddings"]
    scheduler = _load_json(base / "scheduler" / "scheduler_config.json")
    scheduler["prediction_type"] = prediction
    return {
        "model_index.json": SD_MODEL_INDEX,
        "unet/config.json": unet_config(h, _load_json(base / "unet" / "config.json"), file),
        "vae/config.json": vae_config(h, _load_json(base / "vae" / "config.json"), file),
        "text_encoder/config.json": text,
        "tokenizer/tokenizer_config.json": tok,
        "tokenizer/special_tokens_map.json": _load_json(base / "tokenizer" / "special_tokens_map.json"),
        "scheduler/scheduler_config.json": scheduler,
    }


def sdxl_refiner_configs(h: dict[str, TensorInfo], file: str) -> dict[str, dict[str, Any]]:
    base = package_config_dir("sdxl-refiner")
    text_2 = openclip_config(h, SDXL_REFINER_TEXT_G, _load_json(base / "text_encoder_2" / "config.json"), file)
    return {
        "model_index.json": _load_json(base / "model_index.json"),
        "unet/config.json": unet_config(h, _load_json(base / "unet" / "config.json"), file,
                                        pooled_width=text_2["projection_dim"], size_numbers=5),
        "vae/config.json": vae_config(h, _load_json(base / "vae" / "config.json"), file, scaling=SDXL_VAE_SCALING),
        "text_encoder_2/config.json": text_2,
        "tokenizer_2/tokenizer_config.json": _load_json(base / "tokenizer_2" / "tokenizer_config.json"),
        "tokenizer_2/special_tokens_map.json": _load_json(base / "tokenizer_2" / "special_tokens_map.json"),
        "scheduler/scheduler_config.json": _load_json(base / "scheduler" / "scheduler_config.json"),
    }


def sd1_configs(h: dict[str, TensorInfo], file: str) -> dict[str, dict[str, Any]]:
    """Config file contents keyed by relative path inside a diffusers config folder."""
    base = package_config_dir("sd15")
    text = clip_config(h, SD1_TEXT, _load_json(base / "text_encoder" / "config.json"), file)
    tok = _load_json(base / "tokenizer" / "tokenizer_config.json")
    tok["model_max_length"] = text["max_position_embeddings"]
    return {
        "model_index.json": SD_MODEL_INDEX,
        "unet/config.json": unet_config(h, _load_json(base / "unet" / "config.json"), file, heads_per_level=8),
        "vae/config.json": vae_config(h, _load_json(base / "vae" / "config.json"), file),
        "text_encoder/config.json": text,
        "tokenizer/tokenizer_config.json": tok,
        "tokenizer/special_tokens_map.json": _load_json(base / "tokenizer" / "special_tokens_map.json"),
        "scheduler/scheduler_config.json": _load_json(base / "scheduler" / "scheduler_config.json"),
    }


def standalone_vae_configs(h: dict[str, TensorInfo], file: str) -> dict[str, dict[str, Any]]:
    """Config of a VAE file from models/vae in the original layout (with or without a checkpoint's prefix).

    Any latent width: 4-channel VAEs (SD1.x, SD2.x, SDXL) and 16-channel ones (SD3, Flux; no quant convs)
    read the same way. No latent scale belongs to the VAE: the model's family applies its own.
    """
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in h)), "")
    base = package_config_dir("sd15")
    return {"vae/config.json": vae_config(h, _load_json(base / "vae" / "config.json"), file, prefix)}


def write_config_folder(files: dict[str, dict[str, Any]], cache_root: Path) -> Path:
    """Materialise the config files (plus CLIP's vocab) in a content-addressed cache folder."""
    blob = json.dumps(files, sort_keys=True).encode()
    folder = cache_root / hashlib.sha256(blob).hexdigest()[:16]
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2), encoding="utf-8")
    vocab = package_config_dir("clip_tokenizer")
    for tok_dir in {Path(rel).parent for rel in files if rel.startswith("tokenizer")}:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(vocab / name, tmp / tok_dir / name)
    (tmp / ".complete").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder

"""Random-weight Lotus files in their published layout (tests and demos; no download): the Lotus UNet as in
``diffusion_models/`` (original LDM keys without a prefix, fp16, the 4-input class embedding under ``label_emb.0``)
and a standalone SD VAE as ``vae-ft-mse-840000-ema-pruned.safetensors`` has it (LDM keys without a prefix)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.pipeline.checkpoint_writer import (
    TinySD1,
    _save,
    _unet,
    build_sd1_models,
    unet_to_original,
    vae_to_original,
)

UNET = "model.diffusion_model."


@dataclass(frozen=True)
class TinyLotus:
    """Sizes of a small Lotus UNet: SD2.x's conventions (64 channels per head, linear projections) and its real
    1024-wide cross-attention, so that LotusConditioning's null prompt drives it."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_attention: tuple[bool, ...] = (False, True)
    layers_per_block: int = 1
    cross_attention_dim: int = 1024
    task_inputs: int = 4


def build_lotus_unet(sizes: TinyLotus = TinyLotus(), seed: int = 0) -> Any:
    """A randomly initialised diffusers UNet of Lotus's architecture (class embedding of the task switcher)."""
    torch.manual_seed(seed)
    unet = _unet(sizes.unet_channels, sizes.unet_attention, sizes.layers_per_block, sizes.cross_attention_dim,
                 sample_size=96, attention_head_dim=tuple(max(1, c // 64) for c in sizes.unet_channels),
                 use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
                 projection_class_embeddings_input_dim=sizes.task_inputs)
    with torch.no_grad():  # a random class embedding near zero would hide the task input; make it count
        unet.class_embedding.linear_1.weight.normal_(0, 0.5)
    return unet.eval()


def lotus_to_original(unet: Any, layers: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Lotus UNet's tensors under the original keys (``label_emb.0.0``/``.0.2`` for the class
    embedding), under ``prefix`` (none in the published file)."""
    state = {k.replace("class_embedding.", "add_embedding.", 1): v for k, v in unet.state_dict().items()}
    return {prefix + k[len(UNET):]: v for k, v in unet_to_original(state, layers).items()}


def write_lotus_unet(path: str | os.PathLike[str], sizes: TinyLotus = TinyLotus(), seed: int = 0,
                     dtype: torch.dtype = torch.float16, prefix: str = "") -> Path:
    """A random-weight Lotus UNet file as published for ``diffusion_models/`` (fp16, keys without a prefix)."""
    unet = build_lotus_unet(sizes, seed)
    return _save(lotus_to_original(unet, sizes.layers_per_block, prefix), Path(path), dtype)


def write_sd_vae(path: str | os.PathLike[str], sizes: TinySD1 = TinySD1(), seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight 4-channel SD VAE file (``vae/``) in the original layout without a prefix, as Stability's
    ``vae-ft-mse-840000-ema-pruned.safetensors``."""
    _, vae, _ = build_sd1_models(sizes, seed)
    state = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
    return _save({k.removeprefix("first_stage_model."): v for k, v in state.items()}, Path(path), dtype)

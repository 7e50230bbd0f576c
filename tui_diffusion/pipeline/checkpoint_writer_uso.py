"""Write a random-weight USO style projector in its published layout (tests and demos): ComfyUI's
``model_patches/uso-flux1-projector-v1.safetensors`` holds ``feature_embedder.{high,mid,low}_embedding_linear.0``
(SigLIP tokens -> style tokens), ``feature_embedder.*_layer_norm`` and ``feature_embedder.*_projection`` (SigLIP
width -> the Flux transformer's width), weights and biases each.

The published sizes are SigLIP so400m's 729 tokens of 1152 channels to 64 style tokens of 3072; a tiny one sized
for ``checkpoint_writer_vision.TinyVision`` (16 tokens of 32) and ``checkpoint_writer_dit.TinyFlux`` (128 wide) is
the default here. A SigLIP for USO needs at least 20 layers (it reads the 20th from last).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tui_diffusion.pipeline.checkpoint_writer_dit import save
from tui_diffusion.pipeline.nodes_uso import USO_PREFIX, StyleProjector


@dataclass(frozen=True)
class TinyProjector:
    vision_tokens: int = 16
    style_tokens: int = 4
    vision_width: int = 32
    hidden: int = 128


def uso_projector_keys(sizes: TinyProjector = TinyProjector(), seed: int = 0) -> dict[str, torch.Tensor]:
    """The projector's tensors under the file's names; the layer norms are random too, so a test sees them."""
    torch.manual_seed(seed)
    module = StyleProjector(sizes.vision_tokens, sizes.style_tokens, sizes.vision_width, sizes.hidden)
    out = {}
    for key, value in module.state_dict().items():
        if "layer_norm" in key:
            value = value + 0.1 * torch.randn(value.shape)
        out[USO_PREFIX + key] = value.detach().clone()
    return out


def write_uso_projector(path: str | os.PathLike[str], sizes: TinyProjector = TinyProjector(), seed: int = 0,
                        dtype: str | torch.dtype = "fp32") -> Path:
    return save(uso_projector_keys(sizes, seed), path, dtype)

"""Textual-inversion embeddings (``embedding:name`` in a prompt), as A1111 and ComfyUI read them."""

from __future__ import annotations

from pathlib import Path

import torch

from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.paths import PathError, inside
from tui_diffusion.pipeline.errors import NodeError

PREFIX = "embedding:"


def find_embedding(folder: Path | None, name: str) -> Path:
    if folder is None:
        raise NodeError(f"embedding {name!r}: no embeddings folder")
    for candidate in (name, f"{name}.safetensors"):
        try:
            path = inside(folder, candidate)
        except PathError as exc:
            raise NodeError(f"embedding {name!r}: {exc}") from None
        if path.is_file():
            return path
    raise NodeError(f"embedding {name!r} not found in {folder} (only .safetensors embeddings are read)")


def load_vectors(path: Path, width: int, encoder_index: int) -> torch.Tensor:
    """The embedding's vectors [n, width] for one text encoder (SDXL files hold clip_l and clip_g)."""
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise NodeError(f"{path.name}: only .safetensors embeddings are read (pickle files can run code)")
    try:
        read_header(path)
        state = load_file(str(path))
    except (CheckpointError, OSError) as exc:
        raise NodeError(f"{path.name}: {exc}") from None
    candidates = [state[k] for k in ("clip_l", "clip_g", "emb_params") if k in state] or list(state.values())
    for tensor in candidates:
        vectors = tensor.reshape(-1, tensor.shape[-1])
        if vectors.shape[-1] == width:
            return vectors.float()
    widths = sorted({t.shape[-1] for t in candidates})
    raise NodeError(f"{path.name}: its vectors are {widths} wide, this text encoder (#{encoder_index + 1}) takes "
                    f"{width}: an embedding for another model family?")

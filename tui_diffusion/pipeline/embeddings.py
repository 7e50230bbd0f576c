"""Textual-inversion embeddings (``embedding:name`` in a prompt), as A1111 and ComfyUI read them."""

from __future__ import annotations

from pathlib import Path

import torch

from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.paths import PICKLE_SUFFIXES, PathError, inside
from tui_diffusion.pipeline.errors import NodeError

PREFIX = "embedding:"


def find_embedding(folder: Path | None, name: str) -> Path:
    if folder is None:
        raise NodeError(f"embedding {name!r}: no embeddings folder")
    # as ComfyUI: the name as written, else with the extensions it tries in turn
    for candidate in (name, f"{name}.safetensors", f"{name}.pt", f"{name}.bin"):
        try:
            path = inside(folder, candidate)
        except PathError as exc:
            raise NodeError(f"embedding {name!r}: {exc}") from None
        if path.is_file():
            return path
    raise NodeError(f"embedding {name!r} not found in {folder} (tried .safetensors, .pt and .bin)")


def _pickle_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a pickle embedding: A1111's textual inversion (``string_to_param``) or a plain dict of them
    (diffusers' ``learned_embeds.bin``), read with ``torch.load(weights_only=True)`` and only when allowed."""
    if not allow_pickle:
        raise NodeError(f"{path.name}: pickle embeddings ({path.suffix}) can run arbitrary code when loaded and are "
                        "refused; use a .safetensors version of the embedding, or allow them with --allow-pickle "
                        "(loaded with torch.load(weights_only=True))")
    from tui_diffusion.pipeline.models import load_weights_only

    obj = load_weights_only(path, NodeError)
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        obj = obj["string_to_param"]  # A1111: {"*": vectors}, with the name, step and token beside it
    if not isinstance(obj, dict):
        raise NodeError(f"{path.name}: not an embedding (it holds a {type(obj).__name__})")
    state = {str(k): v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise NodeError(f"{path.name}: not an embedding (no vectors in it)")
    return state


def load_vectors(path: Path, width: int, encoder_index: int, allow_pickle: bool = False) -> torch.Tensor:
    """The embedding's vectors [n, width] for one text encoder (SDXL files hold clip_l and clip_g)."""
    from safetensors.torch import load_file

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        state = _pickle_state(path, allow_pickle)
    elif suffix != ".safetensors":
        raise NodeError(f"{path.name}: not an embedding file (.safetensors, or with --allow-pickle .pt/.bin)")
    else:
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

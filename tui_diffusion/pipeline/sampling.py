"""The initial noise, ComfyUI's way: the one noise contract of every sampler node.

Sigma schedules live in ``schedules.py``, model sampling in ``model_sampling.py`` and the samplers in
``k_samplers.py``; this module only draws noise. ComfyUI draws the initial noise for a whole batch as one
``torch.randn`` from a CPU generator seeded with the seed, so a seed gives the same image on any device;
a latent that came out of a batch (``batch_index``, e.g. from LatentFromBatch) gets the draws its indices
had in that batch.
"""

from __future__ import annotations

import numpy as np
import torch


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI's prepare_noise: one CPU generator; per-index draws when the latent came from a batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.shape, generator=gen, dtype=torch.float32)
    unique, inverse = np.unique(batch_index, return_inverse=True)
    draws = []
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn([1, *latent.shape[1:]], generator=gen, dtype=torch.float32)
        if i in unique:
            draws.append(noise)
    return torch.cat([draws[i] for i in inverse.reshape(-1)])


def noise_for(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``prepare_noise`` for a latent of ``shape`` (benchmarks and tests build their inputs with it)."""
    return prepare_noise(torch.empty(shape), seed)

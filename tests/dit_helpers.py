"""Shared by the SD3 and Flux tests: tiny files written once per module, and a sampling run built from a
family's hooks (what the sampling loop does), to compare with diffusers' pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tui_diffusion.pipeline.device import Device

CPU = Device(torch.device("cpu"), torch.float32, torch.float32, "CPU")


class FamilyDenoiser:
    """x0 from a noisy latent through a family's ``model_kwargs``/``apply_model`` and its model sampling, with
    CFG as one batch (unconditional first), as the project's sampling loop calls a family."""

    def __init__(self, model: Any, positive: list, negative: list | None, cfg: float) -> None:
        self.model, self.family = model, model.family
        self.model_sampling = model.model_sampling
        self.positive, self.negative, self.cfg = positive, negative, cfg

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        entries = ([tuple(c) for c in self.negative] if self.negative else []) + [tuple(c) for c in self.positive]
        n_neg = len(self.negative) if self.negative else 0
        batch = x.shape[0]
        kwargs = self.family.model_kwargs(self.model, entries, batch=batch, latent_shape=tuple(x.shape),
                                          negative=[i < n_neg for i in range(len(entries))],
                                          device=x.device, dtype=torch.float32)
        x_in = torch.cat([x] * len(entries))
        s = sigma.repeat(len(entries))
        out = self.family.apply_model(self.model, self.model_sampling.calculate_input(s, x_in),
                                      self.model_sampling.timestep(s), kwargs)
        denoised = self.model_sampling.calculate_denoised(s, out.float(), x_in).chunk(len(entries))
        if n_neg:
            return denoised[0] + self.cfg * (denoised[1] - denoised[0])
        return denoised[0]


def run(model: Any, positive: list, negative: list | None, cfg: float, noise: torch.Tensor,
        sigmas: torch.Tensor, sampler: str = "euler") -> torch.Tensor:
    """A txt2img run from ``noise`` along ``sigmas``: the final latent in the model's latent space."""
    from tui_diffusion.pipeline.k_samplers import sample

    ms = model.model_sampling
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), True)
    x = sample(sampler, FamilyDenoiser(model, positive, negative, cfg), x, sigmas, seed=0)
    return ms.inverse_noise_scaling(sigmas[-1], x)


def folder(tmp_path_factory: Any, name: str) -> Path:
    return Path(tmp_path_factory.mktemp(name))

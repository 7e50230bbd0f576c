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


def shared_models(tmp_path_factory: Any) -> Path:
    """A models folder with the tiny SD3/Flux files ComfyUI's templates and the shipped workflows name, written
    once per test session (several modules read it; the files are never modified)."""
    from tui_diffusion.pipeline import checkpoint_writer_dit as w

    root = Path(tmp_path_factory.getbasetemp()) / "dit-models"
    done = root / ".complete"
    if done.exists():
        return root
    dm = root / "diffusion_models"
    w.write_flux_transformer(dm / "flux1-dev.safetensors")
    w.write_flux_transformer(dm / "flux1-schnell.safetensors", w.TinyFlux(guidance=False))
    w.write_flux_transformer(dm / "flux1-canny-dev.safetensors", w.TinyFlux(in_channels=128))
    w.write_flux_transformer(dm / "flux1-fill-dev.safetensors", w.TinyFlux(in_channels=384))
    w.write_vae16(root / "vae" / "ae.safetensors", flux=True)
    w.write_text_encoders(root / "text_encoders")
    w.write_flux_checkpoint(root / "checkpoints" / "flux1-schnell-fp8.safetensors", w.TinyFlux(guidance=False),
                            dtype="fp8_e4m3fn")
    w.write_sd3_checkpoint(root / "checkpoints" / "sd3.5_large_fp8_scaled.safetensors", w.TinySD3(depth=1),
                           dtype="fp8_e4m3fn")
    done.touch()
    return root

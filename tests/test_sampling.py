"""The initial noise and how it enters the sampler, as ComfyUI does it (the sigma schedules themselves are
tested in test_schedules.py, the samplers in test_k_samplers.py)."""

from __future__ import annotations

import torch

from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.sampling import noise_for, prepare_noise
from tui_diffusion.pipeline.schedules import calculate_sigmas


def test_initial_latent_scaling_matches_comfyui() -> None:
    ms = DiscreteSampling()
    noise = noise_for(7, (1, 4, 8, 8))
    s0 = float(calculate_sigmas(ms, "normal", 4)[0])
    x = ms.noise_scaling(s0, noise, torch.zeros_like(noise), ms.is_max_denoise(s0))
    torch.testing.assert_close(x, noise * (1 + ms.sigma_max**2) ** 0.5)
    # ddim_uniform at 4 steps starts below sigma_max: the noise is scaled by sigma_0 alone
    low = float(calculate_sigmas(ms, "ddim_uniform", 4)[0])
    assert low < ms.sigma_max and not ms.is_max_denoise(low)
    torch.testing.assert_close(ms.noise_scaling(low, noise, torch.zeros_like(noise), False), noise * low)


def test_noise_is_one_cpu_randn_of_the_whole_batch() -> None:
    gen = torch.Generator().manual_seed(42)
    torch.testing.assert_close(noise_for(42, (2, 4, 8, 8)), torch.randn((2, 4, 8, 8), generator=gen))


def test_a_latent_from_a_batch_gets_the_draws_of_its_indices() -> None:
    whole = prepare_noise(torch.zeros(3, 4, 8, 8), 5)
    picked = prepare_noise(torch.zeros(2, 4, 8, 8), 5, batch_index=[2, 0])
    torch.testing.assert_close(picked, whole[[2, 0]])

"""ComfyUI's sigma sequences, and their installation into diffusers' schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tui_diffusion.pipeline.sampling import (
    RECIPES,
    ModelSampling,
    calculate_sigmas,
    initial_latent,
    ksampler_sigmas,
    noise_for,
    prepare_sampler,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfyui-sigmas.json").read_text())
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def test_model_sigma_range_matches_comfyui() -> None:
    ms = ModelSampling()
    assert ms.sigma_min == pytest.approx(REFERENCE["sigma_min"], rel=1e-6)
    assert ms.sigma_max == pytest.approx(REFERENCE["sigma_max"], rel=1e-6)


@pytest.mark.parametrize(("scheduler", "steps"),
                         [(s, int(n)) for s, by_n in REFERENCE["schedulers"].items() for n in by_n])
def test_sigma_sequences_match_comfyui(scheduler: str, steps: int) -> None:
    expected = torch.tensor(REFERENCE["schedulers"][scheduler][str(steps)])
    got = calculate_sigmas(ModelSampling(), scheduler, steps)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_samplers_that_drop_the_penultimate_sigma() -> None:
    ms = ModelSampling()
    full = calculate_sigmas(ms, "karras", 5)
    got = ksampler_sigmas(ms, "dpm_2", "karras", 4, 1.0)
    torch.testing.assert_close(got, torch.cat([full[:-2], full[-1:]]))
    assert len(ksampler_sigmas(ms, "euler", "karras", 4, 1.0)) == 5


def test_partial_denoise_takes_the_tail_of_a_longer_schedule() -> None:
    ms = ModelSampling()
    got = ksampler_sigmas(ms, "euler", "normal", 10, 0.5)
    torch.testing.assert_close(got, calculate_sigmas(ms, "normal", 20)[-11:])


@pytest.mark.parametrize("sampler", [s for s in RECIPES if s != "pndm"])
def test_installed_schedule_is_the_comfyui_one(sampler: str) -> None:
    prepared = prepare_sampler(sampler, "karras", 6, 1.0, SD15_SCHEDULER, seed=3)
    expected = ksampler_sigmas(ModelSampling(), sampler, "karras", 6, 1.0)
    sigmas = prepared.scheduler.sigmas
    # second-order schedulers repeat their inner sigmas; the distinct values are the schedule
    assert torch.unique_consecutive(sigmas).tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    # the UNet is given the training timestep nearest in log-sigma, as ComfyUI's discrete sampling does
    first_t = prepared.scheduler.timesteps[0]
    assert int(first_t) == int(ModelSampling().timestep(expected[:1])[0])


def test_initial_latent_scaling_matches_comfyui() -> None:
    ms = ModelSampling()
    noise = noise_for(7, (1, 4, 8, 8))
    full = prepare_sampler("euler", "normal", 4, 1.0, SD15_SCHEDULER, 7)
    x = initial_latent(full, torch.zeros_like(noise), noise, ms.sigma_max)
    torch.testing.assert_close(x, noise * (1 + ms.sigma_max**2) ** 0.5)
    # ddim_uniform at 4 steps starts below sigma_max: the noise is scaled by sigma_0 alone
    low = prepare_sampler("euler", "ddim_uniform", 4, 1.0, SD15_SCHEDULER, 7)
    s0 = float(low.sigmas[0])
    assert s0 < ms.sigma_max
    torch.testing.assert_close(initial_latent(low, torch.zeros_like(noise), noise, ms.sigma_max), noise * s0)


def test_noise_is_one_cpu_randn_of_the_whole_batch() -> None:
    gen = torch.Generator().manual_seed(42)
    torch.testing.assert_close(noise_for(42, (2, 4, 8, 8)), torch.randn((2, 4, 8, 8), generator=gen))

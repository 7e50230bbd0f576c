"""Model sampling objects and ComfyUI's schedulers, against sigma sequences ComfyUI computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tui_diffusion.graph.samplers import SCHEDULERS
from tui_diffusion.pipeline.model_sampling import (
    DiscreteFlowSampling,
    DiscreteSampling,
    EDMSampling,
    FluxSampling,
    ModelSampling,
    flux_resolution_shift,
)
from tui_diffusion.pipeline.schedules import calculate_sigmas, ksampler_sigmas, sd_turbo_sigmas

DATA = Path(__file__).parent / "data"
DISCRETE = json.loads((DATA / "comfyui-sigmas.json").read_text())
FLOW = json.loads((DATA / "comfyui-sigmas-flow.json").read_text())

FLOW_SAMPLINGS = {
    "sd3_shift3": lambda: DiscreteFlowSampling(shift=3.0),
    "sd3_shift1": lambda: DiscreteFlowSampling(shift=1.0),
    "flux_dev_shift1.15": lambda: FluxSampling(shift=1.15),
    "flux_schnell_shift1.0": lambda: FluxSampling(shift=1.0),
}


def test_discrete_sigma_range_matches_comfyui() -> None:
    ms = DiscreteSampling()
    assert ms.sigma_min == pytest.approx(DISCRETE["sigma_min"], rel=1e-6)
    assert ms.sigma_max == pytest.approx(DISCRETE["sigma_max"], rel=1e-6)


@pytest.mark.parametrize("name", sorted(FLOW["model_sampling"]))
def test_flow_sigma_range_and_timestep_match_comfyui(name: str) -> None:
    ms, expected = FLOW_SAMPLINGS[name](), FLOW["model_sampling"][name]
    assert ms.is_flow
    assert ms.sigma_min == pytest.approx(expected["sigma_min"], rel=1e-6)
    assert ms.sigma_max == pytest.approx(expected["sigma_max"], rel=1e-6)
    assert float(ms.timestep(torch.tensor(0.5))) == pytest.approx(expected["timestep(0.5)"], rel=1e-6)


@pytest.mark.parametrize(("scheduler", "steps"),
                         [(s, int(n)) for s, by_n in DISCRETE["schedulers"].items() for n in by_n])
def test_discrete_schedules_match_comfyui(scheduler: str, steps: int) -> None:
    expected = torch.tensor(DISCRETE["schedulers"][scheduler][str(steps)])
    got = calculate_sigmas(DiscreteSampling(), scheduler, steps)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", sorted(FLOW["schedules"]))
def test_flow_schedules_match_comfyui(key: str) -> None:
    name, scheduler, steps = key.split("/")
    expected = torch.tensor(FLOW["schedules"][key])
    got = calculate_sigmas(FLOW_SAMPLINGS[name](), scheduler, int(steps))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_every_scheduler_name_has_reference_data() -> None:
    assert set(DISCRETE["schedulers"]) == set(SCHEDULERS)
    assert {k.split("/")[1] for k in FLOW["schedules"]} == set(SCHEDULERS)


def test_v_prediction_differs_from_eps_only_in_the_denoised_latent() -> None:
    eps, v = DiscreteSampling("eps"), DiscreteSampling("v")
    torch.testing.assert_close(calculate_sigmas(eps, "karras", 6), calculate_sigmas(v, "karras", 6))
    x, out, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([2.0, 0.5])
    s = sigma.view(2, 1, 1, 1)
    torch.testing.assert_close(eps.calculate_denoised(sigma, out, x), x - out * s)
    # v = alpha * eps - sigma_vp * x0 in the unit-variance input's terms: x0 = x / (s^2+1) - out * s / sqrt(s^2+1)
    torch.testing.assert_close(v.calculate_denoised(sigma, out, x), x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5)
    torch.testing.assert_close(eps.calculate_input(sigma, x), x / (s**2 + 1) ** 0.5)


def test_v_prediction_from_a_diffusers_config() -> None:
    assert DiscreteSampling.from_scheduler_config({"prediction_type": "v_prediction"}).prediction == "v"
    assert DiscreteSampling.from_scheduler_config({"prediction_type": "epsilon"}).prediction == "eps"


def test_flow_noise_scaling_mixes_linearly_and_is_undone() -> None:
    ms = DiscreteFlowSampling(shift=3.0)
    noise, latent = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    mixed = ms.noise_scaling(torch.tensor(0.25), noise, latent)
    torch.testing.assert_close(mixed, 0.25 * noise + 0.75 * latent)
    torch.testing.assert_close(ms.inverse_noise_scaling(0.25, latent * 0.75), latent)
    # flow models predict velocity: denoised = x - sigma * v
    torch.testing.assert_close(ms.calculate_denoised(torch.tensor([0.25]), noise - latent, mixed), latent)
    assert ms.calculate_input(torch.tensor([0.25]), mixed) is mixed


def test_eps_noise_scaling_full_and_partial_denoise() -> None:
    ms = DiscreteSampling()
    noise, latent = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    s = ms.sigma_max
    assert ms.is_max_denoise(s) and not ms.is_max_denoise(4.0)
    torch.testing.assert_close(ms.noise_scaling(s, noise, torch.zeros_like(noise), True), noise * (1 + s * s) ** 0.5)
    torch.testing.assert_close(ms.noise_scaling(4.0, noise, latent, False), latent + 4.0 * noise)
    assert ms.inverse_noise_scaling(0.0, latent) is latent


def test_discrete_timestep_is_the_nearest_training_step() -> None:
    ms = DiscreteSampling()
    assert int(ms.timestep(torch.tensor(ms.sigma_max))) == 999
    assert int(ms.timestep(torch.tensor(ms.sigma_min))) == 0
    assert float(ms.sigma(torch.tensor(999.0))) == pytest.approx(ms.sigma_max)
    assert ms.percent_to_sigma(0.0) > ms.sigma_max and ms.percent_to_sigma(1.0) == 0.0


def test_flow_percent_to_sigma_is_the_shifted_time() -> None:
    ms = DiscreteFlowSampling(shift=3.0)
    assert ms.percent_to_sigma(0.5) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    # Flux's shift is mu in exp(mu) / (exp(mu) + 1/t - 1): even shift 1.0 moves the time
    assert FluxSampling(1.0).percent_to_sigma(0.25) == pytest.approx(math.e / (math.e + 1 / 0.75 - 1))


def test_flux_resolution_shift_matches_comfyui_node() -> None:
    # ModelSamplingFlux: base_shift at 256x256, max_shift at 1024x1024, linear in between
    assert flux_resolution_shift(1024, 1024) == pytest.approx(1.15)
    assert flux_resolution_shift(256, 256) == pytest.approx(0.5)
    assert flux_resolution_shift(512, 512) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)


def test_edm_sampling_maps_log_sigma() -> None:
    ms = EDMSampling(sigma_min=0.002, sigma_max=120.0)
    assert ms.sigma_min == pytest.approx(0.002, rel=1e-5) and ms.sigma_max == pytest.approx(120.0, rel=1e-5)
    assert float(ms.sigma(ms.timestep(torch.tensor(3.0)))) == pytest.approx(3.0, rel=1e-6)
    sigmas = calculate_sigmas(ms, "karras", 5)
    assert float(sigmas[0]) == pytest.approx(120.0, rel=1e-5) and float(sigmas[-1]) == 0.0


@pytest.mark.parametrize("ms", [DiscreteSampling(), DiscreteFlowSampling(3.0), FluxSampling(1.15)],
                         ids=["discrete", "sd3", "flux"])
def test_ksampler_sigmas_drop_the_penultimate_for_some_samplers(ms: ModelSampling) -> None:
    full = calculate_sigmas(ms, "karras", 5)
    torch.testing.assert_close(ksampler_sigmas(ms, "dpm_2", "karras", 4), torch.cat([full[:-2], full[-1:]]))
    torch.testing.assert_close(ksampler_sigmas(ms, "euler", "karras", 4), calculate_sigmas(ms, "karras", 4))
    half = ksampler_sigmas(ms, "euler", "normal", 10, 0.5)
    torch.testing.assert_close(half, calculate_sigmas(ms, "normal", 20)[-11:])


def test_unknown_scheduler_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        calculate_sigmas(DiscreteSampling(), "nope", 4)


def test_sd_turbo_sigmas_start_at_timestep_999() -> None:
    ms = DiscreteSampling()
    sigmas = sd_turbo_sigmas(ms, 1)
    assert len(sigmas) == 2 and float(sigmas[0]) == pytest.approx(ms.sigma_max) and float(sigmas[1]) == 0.0
    assert float(sd_turbo_sigmas(ms, 1, denoise=0.5)[0]) == pytest.approx(float(ms.sigma(torch.tensor(499.0))))


def test_auraflow_sampling_is_discrete_flow_with_multiplier_one() -> None:
    # ComfyUI's ModelSamplingAuraFlow: the SD3 flow sampling with timestep = sigma (multiplier 1.0)
    ms = DiscreteFlowSampling(shift=1.73, multiplier=1.0)
    assert float(ms.timestep(torch.tensor(0.5))) == pytest.approx(0.5)
    assert ms.sigma_max == pytest.approx(1.0)
    assert ms.sigma_min == pytest.approx(1.73 * 0.001 / (1 + 0.73 * 0.001), rel=1e-5)
    sd3_like = DiscreteFlowSampling(shift=1.73)
    torch.testing.assert_close(calculate_sigmas(ms, "simple", 4), calculate_sigmas(sd3_like, "simple", 4))

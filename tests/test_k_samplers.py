"""Every sampler in sigma space: ComfyUI's own results on a toy denoiser, and what each sampler is for."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tui_diffusion.graph.samplers import SAMPLERS
from tui_diffusion.pipeline.k_samplers import SAMPLER_FUNCTIONS, sample
from tui_diffusion.pipeline.model_sampling import DiscreteFlowSampling, DiscreteSampling, ModelSampling
from tui_diffusion.pipeline.schedules import calculate_sigmas

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfyui-samplers.json").read_text())
CASES = sorted(k for k, v in REFERENCE["cases"].items() if "final" in v)

# ComfyUI's full list (comfy/samplers.py SAMPLER_NAMES at the reference's commit) plus pndm.
COMFYUI_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)

# float32 round-off is amplified differently by some samplers: the same code run in float64 differs from
# its float32 run by about as much as from ComfyUI, so these get a looser bound than the default 1e-5.
LOOSER = {
    "dpm_adaptive": 1e-4,  # the PID step controller's accept/reject decisions amplify round-off
    "flow/karras/4/dpmpp_sde": 5e-5,  # stepping off sigma 0.99997 (offset first sigma) is ill-conditioned
    "flow/karras/4/dpmpp_sde_gpu": 5e-5,
}


class ToyDenoiser:
    """The reference file's denoiser: 0.8 * tanh(x / sqrt(1 + sigma^2)), or 0.8 * tanh(x) for flow."""

    def __init__(self, ms: ModelSampling) -> None:
        self.model_sampling = ms
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        if self.model_sampling.is_flow:
            return 0.8 * torch.tanh(x)
        return 0.8 * torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5)


def _model_sampling(kind: str) -> ModelSampling:
    return DiscreteFlowSampling(shift=3.0) if kind == "flow" else DiscreteSampling(kind)


def _reference_noise() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)  # the file's torch.manual_seed(1); torch.randn(1, 4, 4, 4)
    return torch.randn(1, 4, 4, 4, generator=gen)


@pytest.mark.parametrize("key", CASES)
def test_matches_comfyui(key: str) -> None:
    case = REFERENCE["cases"][key]
    kind, scheduler, steps, name = key.split("/")
    ms = _model_sampling(kind)
    # the file's sigmas are rounded to 7 decimals: recompute them and check they are the same schedule
    sigmas = calculate_sigmas(ms, scheduler, int(steps))
    if len(case["sigmas"]) == len(sigmas) - 1:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    torch.testing.assert_close(sigmas, torch.tensor(case["sigmas"]), rtol=1e-6, atol=1e-6)
    noise = _reference_noise()
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), ms.is_max_denoise(float(sigmas[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde warns when a query touches the tree's float-rounded ends
        out = ms.inverse_noise_scaling(sigmas[-1], sample(name, ToyDenoiser(ms), x, sigmas, seed=REFERENCE_SEED))
    tol = LOOSER.get(key, LOOSER.get(name, 1e-5))
    torch.testing.assert_close(out.flatten(), torch.tensor(case["final"]), rtol=0, atol=tol)


REFERENCE_SEED = 42


def test_every_comfyui_sampler_name_is_implemented_and_listed() -> None:
    assert list(SAMPLERS) == [*COMFYUI_NAMES, "pndm"]
    assert set(SAMPLER_FUNCTIONS) == set(SAMPLERS)
    tested = {k.split("/")[3] for k in CASES}
    # the reference covers all but the cfg_pp variants, sa_solver (it failed inside that ComfyUI) and pndm
    assert set(SAMPLERS) - tested == {n for n in SAMPLERS if n.endswith("_cfg_pp")} | {
        "sa_solver", "sa_solver_pece", "pndm"}
    assert {n for n, i in SAMPLERS.items() if i.drops_penultimate_sigma} == {"dpm_2", "dpm_2_ancestral", "uni_pc",
                                                                             "uni_pc_bh2"}


# -- CFG++ ---------------------------------------------------------------------------------------------------
class GuidedToy(ToyDenoiser):
    """A CFG denoiser: guided x0 = uncond + scale * (cond - uncond), exposing the unconditional x0."""

    def __init__(self, ms: ModelSampling, scale: float, shift: float = 0.3) -> None:
        super().__init__(ms)
        self.scale, self.shift = scale, shift
        self.uncond_denoised: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = super().__call__(x, sigma)
        uncond = cond * 0.5 - self.shift if self.scale != 1.0 else cond
        self.uncond_denoised = uncond
        return uncond + self.scale * (cond - uncond)


CFG_PP = {n: n.removesuffix("_cfg_pp") for n in SAMPLERS if n.endswith("_cfg_pp")}
# For flow models ComfyUI's Euler ancestral CFG++ renoises the VP way, its plain sampler the rectified-flow way.
NOT_PLAIN_ON_FLOW = {"euler_ancestral_cfg_pp"}


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", sorted(CFG_PP))
def test_cfg_pp_with_uncond_equal_to_cond_is_the_plain_sampler(name: str, kind: str) -> None:
    if kind == "flow" and name in NOT_PLAIN_ON_FLOW:
        pytest.skip("ComfyUI's flow branch of this sampler is not its CFG++ variant's")
    ms = _model_sampling(kind)
    sigmas = calculate_sigmas(ms, "karras", 8)
    x = ms.noise_scaling(sigmas[0], _reference_noise(), torch.zeros(1, 4, 4, 4), True)
    plain = sample(CFG_PP[name], ToyDenoiser(ms), x, sigmas, seed=5)
    same = sample(name, GuidedToy(ms, scale=1.0), x, sigmas, seed=5)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    # a denoiser without an unconditional prediction runs the plain sampler too
    torch.testing.assert_close(sample(name, ToyDenoiser(ms), x, sigmas, seed=5), plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp",
                                  "gradient_estimation_cfg_pp"])
def test_cfg_pp_steps_from_the_guided_prediction_along_the_unconditional_one(name: str) -> None:
    ms = DiscreteSampling()
    s0, s1 = torch.tensor(3.0), torch.tensor(1.5)
    x = _reference_noise() * 3.0
    guided = GuidedToy(ms, scale=4.0)
    out = sample(name, guided, x, torch.stack([s0, s1]), seed=0)
    cond = ToyDenoiser(ms)(x, s0.reshape(1))
    uncond = cond * 0.5 - 0.3
    denoised = uncond + 4.0 * (cond - uncond)
    # CFG++ (Chung et al. 2024): x_next = x0_guided + sigma_next * eps_uncond, eps_uncond = (x - x0_uncond) / sigma
    torch.testing.assert_close(out, denoised + s1 * (x - uncond) / s0, rtol=1e-5, atol=1e-5)
    plain = sample(CFG_PP[name], GuidedToy(ms, scale=4.0), x, torch.stack([s0, s1]), seed=0)
    assert not torch.allclose(out, plain, atol=1e-3)


# -- every sampler samples ---------------------------------------------------------------------------------------
class GaussianDenoiser:
    """The exact denoiser for data ~ N(0, a^2): what any sampler should turn noise into samples of."""

    def __init__(self, ms: ModelSampling, a: float = 0.5) -> None:
        self.model_sampling, self.a = ms, a

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        a2 = self.a**2
        if self.model_sampling.is_flow:  # x = (1 - s) x0 + s n
            return x * (1 - s) * a2 / ((1 - s) ** 2 * a2 + s**2)
        return x * a2 / (a2 + s**2)


# LCM jumps to each prediction and renoises: it needs a consistency model, not an ordinary denoiser.
# ComfyUI's ddpm and ancestral res_multistep renoise the variance-exploding way even for flow models.
NOT_FOR_ORDINARY_MODELS = {("lcm", "eps"), ("lcm", "flow"), ("ddpm", "flow"), ("res_multistep_ancestral", "flow"),
                           ("res_multistep_ancestral_cfg_pp", "flow")}


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_turns_noise_into_the_data_distribution(name: str, kind: str) -> None:
    if (name, kind) in NOT_FOR_ORDINARY_MODELS:
        pytest.skip("this sampler (as ComfyUI has it) is not meant for this kind of model")
    ms = _model_sampling(kind)
    sigmas = calculate_sigmas(ms, "karras", 30)
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), True)
    steps: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sample(name, GaussianDenoiser(ms), x, sigmas, seed=7, callback=lambda i, *_: steps.append(i))
    out = ms.inverse_noise_scaling(sigmas[-1], out)
    assert torch.isfinite(out).all()
    # first-order samplers (Euler, Euler ancestral, DDPM) land up to 13% off in 30 steps; higher orders within 3%
    assert float(out.std()) == pytest.approx(0.5, rel=0.15)
    assert abs(float(out.mean())) < 0.02
    assert steps and steps[0] == 0


@pytest.mark.parametrize("name", ["pndm", "ipndm", "deis", "uni_pc", "dpmpp_2m", "heun", "lms"])
def test_deterministic_samplers_follow_the_exact_ode(name: str) -> None:
    # for N(0, a^2) data the probability-flow ODE maps x at sigma_max to x * a / sqrt(a^2 + sigma_max^2)
    ms, a = DiscreteSampling(), 0.5
    sigmas = calculate_sigmas(ms, "karras", 20)
    x = ms.noise_scaling(sigmas[0], _reference_noise(), torch.zeros(1, 4, 4, 4), True)
    out = sample(name, GaussianDenoiser(ms, a), x, sigmas, seed=0)
    expected = x * a / (a**2 + float(sigmas[0]) ** 2) ** 0.5
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-3)


def test_pndm_is_plms_its_first_step_is_heun() -> None:
    ms = DiscreteSampling()
    sigmas = torch.tensor([4.0, 2.0])
    x = _reference_noise() * 4
    den = ToyDenoiser(ms)
    torch.testing.assert_close(sample("pndm", den, x, sigmas, seed=0), sample("heun", ToyDenoiser(ms), x, sigmas,
                                                                              seed=0))
    assert den.calls == 2


# -- seeds, callbacks and errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, i in SAMPLERS.items() if i.stochastic])
def test_stochastic_samplers_follow_the_seed(name: str) -> None:
    ms = DiscreteSampling()
    sigmas = calculate_sigmas(ms, "karras", 5)
    x = ms.noise_scaling(sigmas[0], _reference_noise(), torch.zeros(1, 4, 4, 4), True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sample(name, ToyDenoiser(ms), x, sigmas, seed=1)
        b = sample(name, ToyDenoiser(ms), x, sigmas, seed=1)
        c = sample(name, ToyDenoiser(ms), x, sigmas, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_ancestral_noise_is_a_cpu_generator_seeded_with_seed_plus_one() -> None:
    # one Euler ancestral step: x_next = x + d * (sigma_down - sigma) + noise * sigma_up
    ms = DiscreteSampling()
    s0, s1 = torch.tensor(3.0), torch.tensor(1.0)
    x = _reference_noise() * 3
    out = sample("euler_ancestral", ToyDenoiser(ms), x, torch.stack([s0, s1]), seed=10)
    up = (s1**2 * (s0**2 - s1**2) / s0**2) ** 0.5
    down = (s1**2 - up**2) ** 0.5
    d = (x - ToyDenoiser(ms)(x, s0.reshape(1))) / s0
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, x + d * (down - s0) + noise * up)


def test_callback_gets_each_step_with_its_prediction() -> None:
    ms = DiscreteSampling()
    sigmas = calculate_sigmas(ms, "normal", 4)
    seen: list[tuple[int, float]] = []
    x = ms.noise_scaling(sigmas[0], _reference_noise(), torch.zeros(1, 4, 4, 4), True)

    def callback(i: int, xi: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> None:
        assert xi.shape == denoised.shape == x.shape
        seen.append((i, float(sigma)))

    sample("dpmpp_2m", ToyDenoiser(ms), x, sigmas, seed=0, callback=callback)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert [s for _, s in seen] == pytest.approx(sigmas[:-1].tolist())


def test_batch_items_are_sampled_independently() -> None:
    ms = DiscreteSampling()
    sigmas = calculate_sigmas(ms, "karras", 6)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    both = sample("uni_pc_bh2", ToyDenoiser(ms), x, sigmas, seed=0)
    torch.testing.assert_close(both[1:], sample("uni_pc_bh2", ToyDenoiser(ms), x[1:], sigmas, seed=0))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_every_sampler_runs_in_inference_mode(kind: str) -> None:
    # the engine samples under torch.inference_mode; DEIS integrates its coefficients with autograd
    ms = _model_sampling(kind)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigmas = calculate_sigmas(ms, "karras", 5)
        x = ms.noise_scaling(sigmas[0], _reference_noise(), torch.zeros(1, 4, 4, 4), True)
        for name in SAMPLERS:
            assert torch.isfinite(sample(name, ToyDenoiser(ms), x, sigmas, seed=1)).all(), name


def test_unknown_sampler_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        sample("nope", ToyDenoiser(DiscreteSampling()), torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0]), seed=0)


def test_a_walk_of_one_sigma_returns_the_latent() -> None:
    x = torch.ones(1, 4, 2, 2)
    assert sample("euler", ToyDenoiser(DiscreteSampling()), x, torch.tensor([1.0]), seed=0) is x

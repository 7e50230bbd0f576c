"""ComfyUI's schedulers: the sigma sequence for a scheduler name and a step count, on any model sampling.

Each function computes what ``comfy.samplers.calculate_sigmas`` computes (float32, same rounding), from
the model sampling's table (``simple``, ``ddim_uniform``, ``beta``), its timestep/sigma maps
(``normal``, ``sgm_uniform``) or only its sigma range (``karras``, ``exponential``, ``kl_optimal``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tui_diffusion.graph.samplers import SAMPLERS, SCHEDULERS
from tui_diffusion.pipeline.model_sampling import ModelSampling


def _normal(ms: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced between the first and last training timestep, mapped to sigmas."""
    start = ms.timestep(torch.tensor(ms.sigma_max, dtype=torch.float32))
    end = ms.timestep(torch.tensor(ms.sigma_min, dtype=torch.float32))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(float(start), float(end), steps)
    sigmas = [float(ms.sigma(t)) for t in timesteps]
    return torch.tensor(sigmas + ([0.0] if append_zero else []), dtype=torch.float32)


def _karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv, max_inv = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def _exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    sigmas = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def _simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Every len(table)/steps-th entry of the sigma table, from the top."""
    stride = len(ms.sigmas) / steps
    sigmas = [float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=1e-5):
        steps += 1
        sigmas: list[float] = []
    else:
        sigmas = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigmas.append(float(ms.sigmas[x]))
        x += stride
    return torch.tensor(sigmas[::-1], dtype=torch.float32)


def _beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Table entries at the quantiles of a Beta(0.6, 0.6) distribution (arXiv 2407.12173)."""
    from scipy.stats import beta as beta_dist

    total = len(ms.sigmas) - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigmas: list[float] = []
    last = -1.0
    for t in ts:
        if t != last:
            sigmas.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear for the first half of the steps, quadratic after."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        q_coef = diff / (linear_steps * quadratic_steps**2)
        l_coef = threshold_noise / linear_steps - 2 * diff / (quadratic_steps**2)
        const = q_coef * (linear_steps**2)
        quadratic = [q_coef * (i**2) + l_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.tensor(schedule, dtype=torch.float32) * ms.sigmas[-1]


def _kl_optimal(ms: ModelSampling, steps: int) -> torch.Tensor:
    idx = torch.arange(steps, dtype=torch.float32).div_(max(steps - 1, 1))
    sigmas = idx.new_zeros(steps + 1)
    sigmas[:-1] = (idx * math.atan(ms.sigma_min) + (1 - idx) * math.atan(ms.sigma_max)).tan_()
    return sigmas


_SCHEDULERS = {
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": lambda ms, steps: _normal(ms, steps, sgm=True),
    "simple": _simple,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
assert set(_SCHEDULERS) == set(SCHEDULERS)


def calculate_sigmas(model_sampling: ModelSampling, scheduler_name: str, steps: int) -> torch.Tensor:
    """The sigma sequence ComfyUI computes for ``scheduler_name`` and ``steps`` (ends in 0 or near it)."""
    try:
        fn = _SCHEDULERS[scheduler_name]
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler_name!r} (one of {', '.join(SCHEDULERS)})") from None
    if steps < 1:
        return torch.zeros(0)
    return fn(model_sampling, steps)


def ksampler_sigmas(model_sampling: ModelSampling, sampler: str, scheduler: str, steps: int,
                    denoise: float = 1.0) -> torch.Tensor:
    """The sigmas KSampler walks (ComfyUI's ``KSampler.set_steps``).

    A partial denoise takes the tail of a longer schedule; samplers that drop the penultimate sigma
    (``SamplerInfo.drops_penultimate_sigma``) are given steps+1 sigmas less the one before the last.
    """
    info = SAMPLERS.get(sampler)
    if info is None:
        raise ValueError(f"unknown sampler {sampler!r}")
    if denoise <= 0:
        return torch.zeros(0)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    if info.drops_penultimate_sigma:
        sigmas = calculate_sigmas(model_sampling, scheduler, total + 1)
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    else:
        sigmas = calculate_sigmas(model_sampling, scheduler, total)
    return sigmas[-(steps + 1):]


def advanced_sigmas(model_sampling: ModelSampling, sampler: str, scheduler: str, steps: int, start_at_step: int,
                    end_at_step: int, force_full_denoise: bool) -> torch.Tensor:
    """KSamplerAdvanced's walk: steps start..end of the full schedule (ComfyUI's common_ksampler)."""
    sigmas = ksampler_sigmas(model_sampling, sampler, scheduler, steps, 1.0)
    if end_at_step < steps:
        sigmas = sigmas[:end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    return sigmas[start_at_step:]


def sd_turbo_sigmas(model_sampling: ModelSampling, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI's SDTurboScheduler: timesteps 999, 899, ... (ten at most), skipping the first for denoise < 1."""
    start_step = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start_step:start_step + steps]
    sigmas = model_sampling.sigma(timesteps)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


#: OptimalSteps' searched noise levels (ComfyUI's ``nodes_optimalsteps``; from the OptimalSteps paper's code), per
#: model type, from the first step's sigma down to the last (the final 0.001 is replaced by 0)
OPTIMAL_STEPS_LEVELS: dict[str, tuple[float, ...]] = {
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "Wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
            0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
    "Chroma": (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917, 0.9,
               0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451, 0.402, 0.355,
               0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058, 0.048, 0.001),
}


def _loglinear(levels: np.ndarray, count: int) -> np.ndarray:
    """``levels`` (decreasing) resampled to ``count`` values evenly spaced in position, interpolating their logs:
    computed from the smallest up, as ComfyUI does, so the float64 rounding is the same."""
    rising = np.log(levels[::-1])
    resampled = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(levels)), rising)
    return np.exp(resampled)[::-1].copy()


def optimal_steps_sigmas(model_type: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI's OptimalStepsScheduler: the model type's levels taken as they are when there are ``steps + 1`` of
    them, log-linearly resampled otherwise; a partial denoise keeps the last ``round(steps * denoise)`` steps; the
    last sigma is 0. No model sampling is involved: the levels are flow-matching sigmas already."""
    if model_type not in OPTIMAL_STEPS_LEVELS:
        raise ValueError(f"model_type {model_type!r}: expected one of {', '.join(OPTIMAL_STEPS_LEVELS)}")
    kept = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros(0)
        kept = round(steps * denoise)
    levels = np.asarray(OPTIMAL_STEPS_LEVELS[model_type], dtype=np.float64)
    if steps + 1 != len(levels):
        levels = _loglinear(levels, steps + 1)
    sigmas = levels[-(kept + 1):].copy()
    sigmas[-1] = 0.0
    return torch.tensor(sigmas, dtype=torch.float32)

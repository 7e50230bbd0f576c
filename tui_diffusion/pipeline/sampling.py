"""ComfyUI's sampler and scheduler names on top of diffusers' schedulers.

ComfyUI builds a sigma sequence from the scheduler name (``normal``, ``karras``, ...) and runs a
k-diffusion sampler over it, giving the UNet the training timestep whose log-sigma is nearest.
diffusers' scheduler options do not reproduce every one of those sequences, so this module
computes the sequence ComfyUI's way and installs it into the diffusers scheduler that implements
the sampler's update rule (see ``install_sigmas``). The denoising itself is the scheduler's ``step``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tui_diffusion.graph.samplers import SAMPLERS


class ModelSampling:
    """The discrete sigma table of an epsilon/v model (ComfyUI's ``ModelSamplingDiscrete``)."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 beta_schedule: str = "scaled_linear") -> None:
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta schedule {beta_schedule!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> ModelSampling:
        return cls(config.get("beta_start", 0.00085), config.get("beta_end", 0.012),
                   config.get("num_train_timesteps", 1000), config.get("beta_schedule", "scaled_linear"))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest training timestep in log-sigma (what the UNet is given for ``sigma``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        dists = sigma.clamp(min=1e-10).log()[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


# -- ComfyUI's schedulers (comfy.samplers.calculate_sigmas) ----------------------------------------
def _normal(ms: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start = float(ms.timestep(ms.sigma_max)[0])
    end = float(ms.timestep(ms.sigma_min)[0])
    append_zero = True
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(torch.tensor(end))), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in ts]
    return torch.tensor(sigs + ([0.0] if append_zero else []), dtype=torch.float32)


def _karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv, max_inv = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def _exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    sigmas = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def _simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    ss = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def _ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=1e-5):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    ss = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += ss
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def _beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy.stats import beta as beta_dist

    total = len(ms.sigmas) - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigs: list[float] = []
    last = -1.0
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def _linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
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


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    """The sigma sequence (ending in 0) ComfyUI computes for ``scheduler`` and ``steps``."""
    try:
        return _SCHEDULERS[scheduler](ms, steps)
    except KeyError:
        raise ValueError(f"unknown scheduler {scheduler!r}") from None


def ksampler_sigmas(ms: ModelSampling, sampler: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler walks for these settings (ComfyUI's KSampler.set_steps)."""
    info = SAMPLERS[sampler]
    if denoise <= 0:
        return torch.zeros(0)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    if info.drops_penultimate_sigma:
        sigmas = calculate_sigmas(ms, scheduler, total + 1)
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    else:
        sigmas = calculate_sigmas(ms, scheduler, total)
    return sigmas[-(steps + 1):]


# -- diffusers schedulers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerRecipe:
    class_name: str
    options: dict[str, Any]
    #: "ve": k-diffusion latents x = x0 + sigma*eps (scaled by the scheduler);
    #: "vp": latents alpha*x0 + sigma*eps (DPM-Solver, UniPC); "own": the scheduler's own grid.
    space: str


RECIPES: dict[str, SchedulerRecipe] = {
    "euler": SchedulerRecipe("EulerDiscreteScheduler", {}, "ve"),
    # ComfyUI's "ddim" sampler is an Euler step on the chosen schedule
    "ddim": SchedulerRecipe("EulerDiscreteScheduler", {}, "ve"),
    "euler_ancestral": SchedulerRecipe("EulerAncestralDiscreteScheduler", {}, "ve"),
    "heun": SchedulerRecipe("HeunDiscreteScheduler", {}, "ve"),
    "dpm_2": SchedulerRecipe("KDPM2DiscreteScheduler", {}, "ve"),
    "dpm_2_ancestral": SchedulerRecipe("KDPM2AncestralDiscreteScheduler", {}, "ve"),
    "lms": SchedulerRecipe("LMSDiscreteScheduler", {}, "ve"),
    "dpmpp_2m": SchedulerRecipe("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
        "lower_order_final": True}, "vp"),
    "dpmpp_sde": SchedulerRecipe("DPMSolverSDEScheduler", {}, "ve"),
    "uni_pc": SchedulerRecipe("UniPCMultistepScheduler", {"final_sigmas_type": "zero", "solver_order": 2}, "vp"),
    "pndm": SchedulerRecipe("PNDMScheduler", {"skip_prk_steps": True}, "own"),
}

# Options of the checkpoint's own scheduler config that belong to the model, not the sampler.
_MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type", "steps_offset", "set_alpha_to_one", "clip_sample")


@dataclass
class PreparedSampler:
    scheduler: Any
    #: the latent space the scheduler works in: "ve", "vp" or "own" (see SchedulerRecipe)
    space: str
    #: the sigmas walked, first to last (the last is 0 unless noise is left over)
    sigmas: torch.Tensor

    @property
    def evaluations(self) -> int:
        """Model evaluations to run: all of them, or those before an appended final step to 0."""
        if self.space == "own" or float(self.sigmas[-1]) == 0.0:
            return len(self.scheduler.timesteps)
        return (len(self.sigmas) - 1) * self.scheduler.order


def make_scheduler(sampler: str, model_config: dict[str, Any], seed: int) -> Any:
    import diffusers

    recipe = RECIPES[sampler]
    cls = getattr(diffusers, recipe.class_name)
    known = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in model_config.items() if k in _MODEL_KEYS}
    config.update(recipe.options)
    config["timestep_spacing"] = "leading" if recipe.space == "own" else "linspace"
    if "use_karras_sigmas" in known and recipe.space != "own":
        config["use_karras_sigmas"] = True  # the hook install_sigmas uses; see there
    if "noise_sampler_seed" in known:
        config["noise_sampler_seed"] = seed
    return cls.from_config({k: v for k, v in config.items() if k in known})


def install_sigmas(scheduler: Any, ms: ModelSampling, sigmas: torch.Tensor) -> None:
    """Make a diffusers scheduler walk ``sigmas`` (n+1 values ending in 0).

    Schedulers with Karras support convert their base sigmas in one method, ``_convert_to_karras``,
    and derive UNet timesteps in another, ``_sigma_to_t``. Overriding those two on this instance
    lets the scheduler lay out everything else itself (interleaved second-order sigmas, ancestral
    up/down sigmas, midpoints), with ComfyUI's sigmas and ComfyUI's nearest-timestep rule.
    """
    body = sigmas[:-1].double().numpy()
    if getattr(scheduler.config, "use_karras_sigmas", False):
        scheduler._convert_to_karras = lambda in_sigmas, num_inference_steps=None: body.copy()
        scheduler._sigma_to_t = lambda sigma, log_sigmas: float(ms.timestep(torch.tensor(float(sigma)))[0])
        scheduler.set_timesteps(len(body))
    else:  # one sigma per step (Euler ancestral): set the grid directly
        scheduler.set_timesteps(len(body))
        scheduler.sigmas = sigmas.to(torch.float32).cpu()
        scheduler.timesteps = ms.timestep(sigmas[:-1]).to(torch.float32)
    scheduler.set_begin_index(0)


def advanced_sigmas(ms: ModelSampling, sampler: str, scheduler: str, steps: int, start_at_step: int,
                    end_at_step: int, force_full_denoise: bool) -> torch.Tensor:
    """KSamplerAdvanced's walk: steps start..end of the full schedule (ComfyUI's common_ksampler)."""
    sigmas = ksampler_sigmas(ms, sampler, scheduler, steps, 1.0)
    if end_at_step < steps:
        sigmas = sigmas[:end_at_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    return sigmas[start_at_step:]


def prepare_sampler(sampler: str, scheduler_name: str, steps: int, denoise: float,
                    model_config: dict[str, Any], seed: int, sigmas: torch.Tensor | None = None) -> PreparedSampler:
    """A diffusers scheduler set up to walk ComfyUI's sigmas (or the given ones).

    A walk that ends above sigma 0 (KSamplerAdvanced with leftover noise) is installed with a final
    step to 0 appended; the caller stops before it (``PreparedSampler.evaluations``).
    """
    ms = ModelSampling.from_scheduler_config(model_config)
    recipe = RECIPES[sampler]
    scheduler = make_scheduler(sampler, model_config, seed)
    if recipe.space == "own":
        # PNDM keeps its own integer grid; denoise < 1 keeps its last steps
        total = steps if denoise >= 0.9999 else int(steps / denoise)
        scheduler.set_timesteps(total)
        keep = len(scheduler.timesteps) - steps if denoise < 0.9999 else 0
        scheduler.timesteps = scheduler.timesteps[keep:]
        sigmas = ms.sigmas[scheduler.timesteps.long()]
        sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        return PreparedSampler(scheduler, "own", sigmas)
    if sigmas is None:
        sigmas = ksampler_sigmas(ms, sampler, scheduler_name, steps, denoise)
    walk = sigmas if float(sigmas[-1]) == 0.0 else torch.cat([sigmas, sigmas.new_zeros([1])])
    install_sigmas(scheduler, ms, walk)
    return PreparedSampler(scheduler, recipe.space, sigmas)


def initial_latent(prepared: PreparedSampler, latent: torch.Tensor, noise: torch.Tensor,
                   model_sigma_max: float) -> torch.Tensor:
    """ComfyUI's noise scaling, expressed in the scheduler's latent space."""
    s0 = float(prepared.sigmas[0])
    if prepared.space == "own":
        sched = prepared.scheduler
        if torch.count_nonzero(latent) == 0:
            return noise * sched.init_noise_sigma
        return sched.add_noise(latent, noise, sched.timesteps[:1])
    max_denoise = math.isclose(s0, model_sigma_max, rel_tol=1e-5) or s0 > model_sigma_max
    x = latent + noise * (math.sqrt(1.0 + s0 * s0) if max_denoise else s0)
    if prepared.space == "vp":
        x = x / math.sqrt(1.0 + s0 * s0)
    return x


def noise_for(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's initial noise: one randn of the whole batch from a CPU generator seeded with seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")


def step_generator(seed: int) -> torch.Generator:
    """Per-step noise for ancestral samplers: CPU generator seeded with seed + 1, as ComfyUI does."""
    return torch.Generator(device="cpu").manual_seed(seed + 1)


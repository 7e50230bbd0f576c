"""Model sampling: how a family's network relates sigma, its timestep input and its output.

ComfyUI (``comfy/model_sampling.py``) splits this in two: the prediction kind (eps, v, flow/"CONST",
EDM), which says how the network's output becomes the denoised latent and how noise is mixed into a
clean latent; and the time parameterisation (a discrete table of 1000 training sigmas, a shifted flow
time, Flux's exponential shift, EDM's continuous log-sigma), which says what timestep the network is
given for a sigma and which sigma range the schedulers span. One class per time parameterisation here,
each taking the prediction kind, with the values ComfyUI computes (float32, the same formulas), so the
schedules and samplers built on top reproduce ComfyUI's numbers.

Every object has ``sigma_min``, ``sigma_max`` (floats), ``sigmas`` (the ascending table the
``simple``/``ddim_uniform``/``beta`` schedulers index), ``timestep(sigma)``, ``sigma(timestep)``,
``percent_to_sigma(p)``, ``calculate_input``, ``calculate_denoised``, ``noise_scaling`` and
``inverse_noise_scaling``; ``is_flow`` tells the samplers that treat rectified-flow models differently.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PREDICTIONS = ("eps", "v", "flow", "edm")


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """A batch of sigmas shaped to broadcast over latents of ``ndim`` dimensions."""
    sigma = _as_tensor(sigma)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


class ModelSampling:
    """The prediction-kind half: output to denoised latent, noise into a clean latent."""

    prediction: str = "eps"
    sigma_data: float = 1.0
    sigmas: torch.Tensor

    def __init__(self, prediction: str = "eps") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r} (one of {', '.join(PREDICTIONS)})")
        self.prediction = prediction

    @property
    def is_flow(self) -> bool:
        """Rectified flow (ComfyUI's CONST): x = (1 - sigma) * x0 + sigma * noise."""
        return self.prediction == "flow"

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: Any) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def sigma(self, timestep: Any) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def percent_to_sigma(self, percent: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- the prediction kind ---------------------------------------------------------------------------
    def calculate_input(self, sigma: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """What the network is fed for the noisy latent at ``sigma`` (eps/v/EDM scale it to unit variance)."""
        if self.is_flow:
            return noisy
        s = _per_sample(sigma, noisy.ndim)
        return noisy / (s**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        """The denoised latent (x0) from the network's output."""
        s = _per_sample(sigma, model_output.ndim)
        if self.prediction in ("eps", "flow"):
            return model_input - model_output * s
        sd2 = self.sigma_data**2
        skip = model_input * sd2 / (s**2 + sd2)
        out = model_output * s * self.sigma_data / (s**2 + sd2) ** 0.5
        return skip - out if self.prediction == "v" else skip + out

    def noise_scaling(self, sigma: Any, noise: torch.Tensor, latent: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The sampler's starting latent: ``latent`` noised to ``sigma`` (ComfyUI's noise scaling).

        At full denoise an eps/v model starts from noise * sqrt(1 + sigma^2), the variance of
        x0 + sigma * noise for unit-variance data; flow models mix linearly.
        """
        s = _per_sample(_as_tensor(sigma).to(noise.dtype), noise.ndim)
        if self.is_flow:
            return s * noise + (1.0 - s) * latent
        scaled = noise * torch.sqrt(1.0 + s**2.0) if max_denoise else noise * s
        return scaled + latent

    def inverse_noise_scaling(self, sigma: Any, latent: torch.Tensor) -> torch.Tensor:
        """Undo ``noise_scaling``'s mixing at the last sigma (only flow models scale)."""
        if self.is_flow:
            return latent / (1.0 - _per_sample(_as_tensor(sigma).to(latent.dtype), latent.ndim))
        return latent

    def is_max_denoise(self, first_sigma: float) -> bool:
        """Whether a walk starting at ``first_sigma`` starts from pure noise (ComfyUI's max_denoise)."""
        return math.isclose(self.sigma_max, first_sigma, rel_tol=1e-5) or first_sigma > self.sigma_max

    def describe(self) -> str:
        return f"{type(self).__name__}({self.prediction})"


class DiscreteSampling(ModelSampling):
    """A DDPM-trained eps or v model: 1000 training sigmas from its betas (ComfyUI's ModelSamplingDiscrete).

    The network is given the training timestep whose log-sigma is nearest; ``sigma(t)`` interpolates
    log-sigma between training timesteps.
    """

    def __init__(self, prediction: str = "eps", beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 trained_betas: list[float] | None = None, zero_terminal_snr: bool = False) -> None:
        super().__init__(prediction)
        if prediction not in ("eps", "v"):
            raise ValueError(f"a discrete model predicts eps or v, not {prediction!r}")
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta schedule {beta_schedule!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod.float()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], prediction: str | None = None) -> DiscreteSampling:
        """From a diffusers scheduler config (``prediction_type`` epsilon or v_prediction)."""
        if prediction is None:
            prediction = "v" if config.get("prediction_type") == "v_prediction" else "eps"
        return cls(prediction, config.get("beta_start", 0.00085), config.get("beta_end", 0.012),
                   config.get("num_train_timesteps", 1000), config.get("beta_schedule", "scaled_linear"),
                   config.get("trained_betas"), bool(config.get("rescale_betas_zero_snr", False)))

    def timestep(self, sigma: Any) -> torch.Tensor:
        sigma = _as_tensor(sigma)
        log_sigma = sigma.float().clamp(min=1e-10).log().to(self.log_sigmas.device)
        dists = log_sigma.reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: Any) -> torch.Tensor:
        timestep = _as_tensor(timestep)
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))



class LCMSampling(DiscreteSampling):
    """An LCM (latent consistency) model or LoRA on a DDPM model (ComfyUI's ModelSamplingDiscrete "lcm": the
    ModelSamplingDiscreteDistilled schedule with the LCM prediction).

    The schedule keeps 50 of the 1000 training sigmas (every 20th, ending at the last), and a sigma is given
    the timestep at the end of its 20-step span; the x0 is the consistency model's blend of the eps x0 and the
    input, ``c_out * x0 + c_skip * x`` with sigma_data 0.5 and the timestep scaled by 10.
    """

    original_timesteps = 50

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 zero_terminal_snr: bool = False) -> None:
        super().__init__("eps", beta_start, beta_end, num_train_timesteps, beta_schedule, trained_betas,
                         zero_terminal_snr)
        self.prediction = "lcm"
        total = len(self.sigmas)
        self.skip_steps = total // self.original_timesteps
        picked = [total - 1 - x * self.skip_steps for x in range(self.original_timesteps)][::-1]
        self.sigmas = self.sigmas[picked].clone()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], prediction: str | None = None) -> LCMSampling:
        return cls(config.get("beta_start", 0.00085), config.get("beta_end", 0.012),
                   config.get("num_train_timesteps", 1000), config.get("beta_schedule", "scaled_linear"),
                   config.get("trained_betas"), bool(config.get("rescale_betas_zero_snr", False)))

    def timestep(self, sigma: Any) -> torch.Tensor:
        return super().timestep(sigma) * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep: Any) -> torch.Tensor:
        timestep = _as_tensor(timestep)
        return super().sigma((timestep.float() - (self.skip_steps - 1)) / self.skip_steps)

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        sigma = _as_tensor(sigma)
        s = _per_sample(sigma, model_output.ndim)
        t = _per_sample(self.timestep(sigma.reshape(-1)).reshape(sigma.shape).float(), model_output.ndim)
        x0 = model_input - model_output * s
        scaled = t.to(model_output) * 10.0
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        return c_out * x0 + c_skip * model_input

    def describe(self) -> str:
        return "LCMSampling(lcm)"

def _rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (Lin et al. 2023)."""
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    out = sqrt_ac**2
    out[-1] = 4.8973451890853435e-08  # ComfyUI's stand-in for exactly zero, which has no finite sigma
    return out


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """SD3's timestep shift: larger shifts spend more steps at high noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class DiscreteFlowSampling(ModelSampling):
    """Rectified flow with SD3's shift (ComfyUI's ModelSamplingDiscreteFlow): timestep = sigma * multiplier.

    SD3/SD3.5 use shift 3.0 and multiplier 1000; AuraFlow multiplier 1.0 (ModelSamplingAuraFlow).
    """

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        super().__init__("flow")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * self.multiplier)

    def timestep(self, sigma: Any) -> torch.Tensor:
        return _as_tensor(sigma) * self.multiplier

    def sigma(self, timestep: Any) -> torch.Tensor:
        return time_snr_shift(self.shift, _as_tensor(timestep) / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))

    def describe(self) -> str:
        return f"DiscreteFlowSampling(shift={self.shift:g}, multiplier={self.multiplier:g})"


def flux_time_shift(mu: float, sigma: float, t: Any) -> Any:
    """Flux's exponential time shift: exp(mu) / (exp(mu) + (1/t - 1)^sigma)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class FluxSampling(ModelSampling):
    """Flux.1's flow sampling (ComfyUI's ModelSamplingFlux): the network is given sigma itself.

    Flux dev defaults to shift 1.15 and schnell to 1.0; ComfyUI's ModelSamplingFlux node derives the shift
    from the image size (``flux_resolution_shift``).
    """

    def __init__(self, shift: float = 1.15, timesteps: int = 10000) -> None:
        super().__init__("flow")
        self.shift = float(shift)
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def timestep(self, sigma: Any) -> torch.Tensor:
        return _as_tensor(sigma)

    def sigma(self, timestep: Any) -> torch.Tensor:
        return flux_time_shift(self.shift, 1.0, _as_tensor(timestep))

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flux_time_shift(self.shift, 1.0, 1.0 - percent))

    def describe(self) -> str:
        return f"FluxSampling(shift={self.shift:g})"


def flux_resolution_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """ComfyUI's ModelSamplingFlux shift for an image size: linear in the number of 2x2 latent patches.

    256 patches (a 256x256 image) give ``base_shift``, 4096 patches (1024x1024) give ``max_shift``.
    """
    x1, x2 = 256, 4096
    slope = (max_shift - base_shift) / (x2 - x1)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base_shift - slope * x1)


class EDMSampling(ModelSampling):
    """A continuous-time model (ComfyUI's ModelSamplingContinuousEDM): timestep = log(sigma) / 4.

    Prediction ``edm`` (Karras et al.'s preconditioning) or ``v`` (ModelSamplingContinuousV); the
    1000-entry log-uniform table exists for the schedulers that index one.
    """

    def __init__(self, prediction: str = "edm", sigma_min: float = 0.002, sigma_max: float = 120.0,
                 sigma_data: float = 1.0) -> None:
        super().__init__(prediction)
        if prediction not in ("edm", "v", "eps"):
            raise ValueError(f"continuous EDM sampling predicts edm, v or eps, not {prediction!r}")
        self.sigma_data = float(sigma_data)
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: Any) -> torch.Tensor:
        return 0.25 * _as_tensor(sigma).log()

    def sigma(self, timestep: Any) -> torch.Tensor:
        return (_as_tensor(timestep) / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_min = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - log_min) * (1.0 - percent) + log_min)

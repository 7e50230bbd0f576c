"""ComfyUI's custom sampling nodes: a sampler, sigmas, a noise source and a guider, put together by
SamplerCustom / SamplerCustomAdvanced (the shape of ComfyUI's Flux and turbo workflows).

The values crossing the new sockets are small: SAMPLER is a ``SamplerChoice`` (a name of
``graph.samplers.SAMPLERS``), SIGMAS a 1-D float tensor, NOISE a ``NoiseSource`` (a seed, or none) and
GUIDER a ``Guider`` (model, conditionings, cfg). Sampling itself is KSampler's (``ksampler.run_sampler``),
so the same settings give KSampler's image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from tui_diffusion.graph.samplers import SAMPLERS
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.ksampler import run_sampler
from tui_diffusion.pipeline.model_sampling import DiscreteFlowSampling, DiscreteSampling, EDMSampling
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.registry import NodeResult, node
from tui_diffusion.pipeline.schedules import calculate_sigmas, optimal_steps_sigmas, sd_turbo_sigmas


@dataclass(frozen=True)
class SamplerChoice:
    """SAMPLER: which of ComfyUI's samplers walks the sigmas."""

    name: str


@dataclass(frozen=True)
class NoiseSource:
    """NOISE: KSampler's initial noise from ``seed`` (``prepare_noise``), or none at all. The seed also seeds
    the per-step noise of ancestral and SDE samplers (ComfyUI's DisableNoise gives seed 0)."""

    seed: int
    enabled: bool = True


@dataclass(frozen=True)
class Guider:
    """GUIDER: the model and its conditioning; ``negative`` None samples without CFG (BasicGuider)."""

    model: ModelHandle
    positive: list
    negative: list | None = None
    cfg: float = 1.0


def _sample(ctx: NodeContext, guider: Guider, noise: NoiseSource, sampler: SamplerChoice, sigmas: torch.Tensor,
            latent_image: dict) -> NodeResult:
    """Both outputs of SamplerCustom(Advanced): the sampled latent and the last step's denoised prediction."""
    if sigmas.ndim != 1:
        raise NodeError(f"sigmas: expected a 1-D sequence, got shape {tuple(sigmas.shape)}")
    last: dict[str, torch.Tensor] = {}
    out = run_sampler(ctx, guider.model, sampler.name, sigmas, noise.seed, noise.enabled, guider.positive,
                      guider.negative, guider.cfg, latent_image, denoised_out=last)
    if "x0" not in last:
        return NodeResult((out, out))
    x0 = guider.model.family.latent_format.process_out(last["x0"].float().cpu())
    return NodeResult((out, {**out, "samples": x0}))


@node("KSamplerSelect")
def ksampler_select(ctx: NodeContext, sampler_name: str) -> NodeResult:
    if sampler_name not in SAMPLERS:
        raise NodeError(f"unknown sampler {sampler_name!r}")
    return NodeResult((SamplerChoice(sampler_name),))


@node("BasicScheduler")
def basic_scheduler(ctx: NodeContext, model: ModelHandle, scheduler: str, steps: int,
                    denoise: float = 1.0) -> NodeResult:
    """ComfyUI's BasicScheduler: a partial denoise takes the tail of a longer schedule (no sigma dropped)."""
    if denoise <= 0.0:
        return NodeResult((torch.zeros(0),))
    total = steps if denoise >= 1.0 else int(steps / denoise)
    try:
        sigmas = calculate_sigmas(model.model_sampling, scheduler, total)
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    return NodeResult((sigmas[-(steps + 1):].float().cpu(),))


@node("SDTurboScheduler")
def sd_turbo_scheduler(ctx: NodeContext, model: ModelHandle, steps: int = 1, denoise: float = 1.0) -> NodeResult:
    return NodeResult((sd_turbo_sigmas(model.model_sampling, steps, denoise).float().cpu(),))


@node("OptimalStepsScheduler")
def optimal_steps_scheduler(ctx: NodeContext, model_type: str = "FLUX", steps: int = 20,
                            denoise: float = 1.0) -> NodeResult:
    try:
        sigmas = optimal_steps_sigmas(model_type, steps, denoise)
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    return NodeResult((sigmas,))


@node("SplitSigmas")
def split_sigmas(ctx: NodeContext, sigmas: torch.Tensor, step: int = 0) -> NodeResult:
    """The first part ends at ``step``'s sigma and the second starts there, so the two walks join."""
    return NodeResult((sigmas[: step + 1], sigmas[step:]))


@node("FlipSigmas")
def flip_sigmas(ctx: NodeContext, sigmas: torch.Tensor) -> NodeResult:
    if len(sigmas) == 0:
        return NodeResult((sigmas,))
    flipped = sigmas.flip(0).clone()
    if float(flipped[0]) == 0.0:
        flipped[0] = 0.0001  # a walk cannot start at sigma 0 (ComfyUI's value)
    return NodeResult((flipped,))


@node("RandomNoise")
def random_noise(ctx: NodeContext, noise_seed: int) -> NodeResult:
    return NodeResult((NoiseSource(noise_seed),))


@node("DisableNoise")
def disable_noise(ctx: NodeContext) -> NodeResult:
    return NodeResult((NoiseSource(0, enabled=False),))


@node("BasicGuider")
def basic_guider(ctx: NodeContext, model: ModelHandle, conditioning: list) -> NodeResult:
    return NodeResult((Guider(model, conditioning),))


@node("CFGGuider")
def cfg_guider(ctx: NodeContext, model: ModelHandle, positive: list, negative: list, cfg: float = 8.0) -> NodeResult:
    return NodeResult((Guider(model, positive, negative, cfg),))


@node("SamplerCustom")
def sampler_custom(ctx: NodeContext, model: ModelHandle, add_noise: bool, noise_seed: int, cfg: float, positive: list,
                   negative: list, sampler: SamplerChoice, sigmas: torch.Tensor, latent_image: dict) -> NodeResult:
    return _sample(ctx, Guider(model, positive, negative, cfg), NoiseSource(noise_seed, bool(add_noise)), sampler,
                   sigmas, latent_image)


@node("SamplerCustomAdvanced")
def sampler_custom_advanced(ctx: NodeContext, noise: NoiseSource, guider: Guider, sampler: SamplerChoice,
                            sigmas: torch.Tensor, latent_image: dict) -> NodeResult:
    return _sample(ctx, guider, noise, sampler, sigmas, latent_image)


def _default_sampling(model: ModelHandle) -> Any:
    return model.family.default_model_sampling(model)


@node("ModelSamplingAuraFlow")
def model_sampling_aura_flow(ctx: NodeContext, model: ModelHandle, shift: float = 1.73) -> NodeResult:
    """Discrete flow sampling with the network given sigma itself (multiplier 1), for flow models only: an eps
    or v network fed flow latents would only make noise."""
    if not _default_sampling(model).is_flow:
        raise NodeError(f"ModelSamplingAuraFlow needs a rectified-flow model; a {model.family.label} model is not one")
    sampling = DiscreteFlowSampling(shift=shift, multiplier=1.0)
    return NodeResult((dataclasses.replace(model, model_sampling_override=sampling),))


@node("ModelSamplingContinuousEDM")
def model_sampling_continuous_edm(ctx: NodeContext, model: ModelHandle, sampling: str = "v_prediction",
                                  sigma_max: float = 120.0, sigma_min: float = 0.002) -> NodeResult:
    """Continuous-time EDM sampling (timestep = log(sigma) / 4) for UNet models trained that way; ComfyUI's
    ``edm`` choice uses sigma_data 0.5."""
    if not isinstance(_default_sampling(model), (DiscreteSampling, EDMSampling)):  # EDMSampling: CosXL
        raise NodeError(f"ModelSamplingContinuousEDM applies to eps/v UNet models, not to a {model.family.label} one")
    if not 0.0 < sigma_min < sigma_max:
        raise NodeError(f"sigma_min ({sigma_min}) must be above 0 and below sigma_max ({sigma_max})")
    prediction = {"v_prediction": "v", "edm": "edm", "eps": "eps"}[sampling]
    sigma_data = 0.5 if sampling == "edm" else 1.0
    edm = EDMSampling(prediction, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
    return NodeResult((dataclasses.replace(model, model_sampling_override=edm),))

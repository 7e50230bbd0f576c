"""KSampler and KSamplerAdvanced: a diffusers denoising loop with ComfyUI's semantics.

What ComfyUI does and this loop reproduces: noise from a CPU generator (per batch index when a
latent came out of a batch), each conditioning of a list evaluated and averaged (ConditioningCombine),
conditionings limited to a part of the schedule (ConditioningSetTimestepRange), classifier-free
guidance skipped at cfg 1, a noise mask that keeps the unmasked latent (inpainting), and partial
walks that stop with noise left over for a second sampler.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.placement import in_use
from tui_diffusion.pipeline.sampling import (
    ModelSampling,
    PreparedSampler,
    advanced_sigmas,
    initial_latent,
    prepare_sampler,
    step_generator,
)


def latent_preview(latent: torch.Tensor, latent_format: LatentFormat) -> np.ndarray:
    """A rough RGB image of a model-space latent (what the sampler sees), from the family's latent-to-RGB
    factors, which ComfyUI's previewer applies to the same space."""
    x = latent[0].float().cpu()
    factors = torch.tensor(latent_format.rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", x, factors) + torch.tensor(latent_format.rgb_bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI's prepare_noise: one CPU generator; per-index draws when the latent came from a batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.shape, generator=gen, dtype=torch.float32)
    unique, inverse = np.unique(batch_index, return_inverse=True)
    draws = []
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn([1, *latent.shape[1:]], generator=gen, dtype=torch.float32)
        if i in unique:
            draws.append(noise)
    return torch.cat([draws[i] for i in inverse.reshape(-1)])


def _percent_to_sigma(ms: ModelSampling, percent: float) -> float:
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    return float(ms.sigma(torch.tensor((1.0 - percent) * 999.0)))


class _Conds:
    """A conditioning list with each entry's sigma window."""

    def __init__(self, conds: list, ms: ModelSampling, name: str) -> None:
        if not conds:
            raise NodeError(f"{name}: empty conditioning")
        self.entries = []
        for emb, extras in conds:
            high = _percent_to_sigma(ms, extras.get("timestep_start", 0.0))
            low = _percent_to_sigma(ms, extras.get("timestep_end", 1.0))
            self.entries.append(((emb, extras), low, high))

    def active(self, sigma: float) -> list[tuple[torch.Tensor, dict]]:
        """The entries whose window holds ``sigma`` (all of them when none does)."""
        return [c for c, low, high in self.entries if low <= sigma <= high] or [c for c, _, _ in self.entries]


def _mask_for(latent: dict, shape: torch.Size) -> torch.Tensor | None:
    mask = latent.get("noise_mask")
    if mask is None:
        return None
    mask = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    mask = F.interpolate(mask, size=shape[-2:], mode="bilinear")
    return mask.expand(shape[0] if mask.shape[0] == 1 else mask.shape[0], shape[1], -1, -1)[: shape[0]]


def sample(ctx: NodeContext, model: ModelHandle, prepared: PreparedSampler, seed: int, add_noise: bool, cfg: float,
           positive: list, negative: list, latent_image: dict) -> dict:
    with in_use(model.unet), patched({"unet": model.unet}, list(model.patches)):
        return _sample(ctx, model, prepared, seed, add_noise, cfg, positive, negative, latent_image)


@torch.inference_mode()
def _sample(ctx: NodeContext, model: ModelHandle, prepared: PreparedSampler, seed: int, add_noise: bool, cfg: float,
           positive: list, negative: list, latent_image: dict) -> dict:
    dev = model.device
    sched = prepared.scheduler
    family = model.family
    fmt = family.latent_format
    ms = ModelSampling.from_scheduler_config(model.scheduler_config)
    latent = fmt.process_in(latent_image["samples"].float())
    noise = (prepare_noise(latent, seed, latent_image.get("batch_index")) if add_noise
             else torch.zeros_like(latent))
    x = initial_latent(prepared, latent, noise, ms.sigma_max).to(dev.torch_device)
    mask = _mask_for(latent_image, latent.shape)
    if mask is not None:
        mask, keep, noise_dev = mask.to(dev.torch_device), latent.to(dev.torch_device), noise.to(dev.torch_device)

    concat = family.extra_channels(model, latent, mask)
    if concat is not None:
        concat = concat.to(dev.torch_device, dev.dtype)
    pos, neg = _Conds(positive, ms, "positive"), _Conds(negative, ms, "negative")
    use_cfg = not math.isclose(cfg, 1.0)
    batch = latent.shape[0]
    extra: dict[str, Any] = {"return_dict": False}
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = step_generator(seed)
    vp = prepared.space in ("vp", "own")
    v_pred = model.scheduler_config.get("prediction_type") == "v_prediction"
    family.check_conditioning(model, [c for c, _, _ in pos.entries + neg.entries])

    timesteps = sched.timesteps[: prepared.evaluations]
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        ctx.check_interrupt()
        sigma = float(ms.sigma(t.float().cpu()))
        if mask is not None:  # outside the mask the latent stays the input latent at this noise level
            outside = keep + sigma * noise_dev
            x = x * mask + (outside / math.sqrt(1 + sigma * sigma) if vp else outside) * (1 - mask)
        conds = pos.active(sigma)
        unconds = neg.active(sigma) if use_cfg else []
        entries = unconds + conds
        kwargs = family.model_kwargs(model, entries, batch=batch, latent_shape=tuple(latent.shape),
                                     negative=[j < len(unconds) for j in range(len(entries))],
                                     device=dev.torch_device, dtype=dev.dtype)
        x_in = sched.scale_model_input(torch.cat([x] * len(entries)), t).to(dev.dtype)
        if concat is not None:
            x_in = torch.cat([x_in, concat.repeat(len(entries), 1, 1, 1)], dim=1)
        out = family.apply_model(model, x_in, t.to(dev.torch_device), kwargs).float()
        parts = out.chunk(len(entries))
        eps_cond = torch.stack(parts[len(unconds):]).mean(0)
        if use_cfg:
            eps_uncond = torch.stack(parts[: len(unconds)]).mean(0)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        else:
            eps = eps_cond
        if mask is not None:  # outside the mask the prediction is the one that keeps the input latent
            if v_pred:
                target = (noise_dev - sigma * keep) / math.sqrt(1 + sigma * sigma)
            else:
                target = noise_dev
            eps = eps * mask + target * (1 - mask)
        step = sched.step(eps, t, x, **extra)
        x = step[0]
        preview = None
        if ctx.want_previews:
            denoised = step[1] if len(step) > 1 and isinstance(step[1], torch.Tensor) else x
            preview = latent_preview(denoised, fmt)
        ctx.report(i + 1, total, preview)
    end = float(prepared.sigmas[-1])
    if vp and end > 0:
        x = x * math.sqrt(1 + end * end)  # hand leftover noise on in ComfyUI's (k-diffusion) scale
    return {**latent_image, "samples": fmt.process_out(x.float().cpu())}


def ksampler(ctx: NodeContext, model: ModelHandle, seed: int, steps: int, cfg: float, sampler_name: str,
             scheduler: str, positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> dict:
    if denoise <= 0:
        return {**latent_image, "samples": latent_image["samples"].clone()}
    prepared = prepare_sampler(sampler_name, scheduler, steps, denoise, model.scheduler_config, seed)
    return sample(ctx, model, prepared, seed, True, cfg, positive, negative, latent_image)


def ksampler_advanced(ctx: NodeContext, model: ModelHandle, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict,
                      start_at_step: int = 0, end_at_step: int = 10000,
                      return_with_leftover_noise: str = "disable") -> dict:
    if sampler_name == "pndm" and (start_at_step > 0 or end_at_step < steps):
        raise NodeError("the pndm sampler runs on its own fixed grid and cannot sample part of a schedule")
    ms = ModelSampling.from_scheduler_config(model.scheduler_config)
    sigmas = advanced_sigmas(ms, sampler_name, scheduler, steps, start_at_step, end_at_step,
                             force_full_denoise=return_with_leftover_noise != "enable")
    if len(sigmas) < 2:
        return {**latent_image, "samples": latent_image["samples"].clone()}
    prepared = prepare_sampler(sampler_name, scheduler, steps, 1.0, model.scheduler_config, noise_seed,
                               sigmas=None if sampler_name == "pndm" else sigmas)
    return sample(ctx, model, prepared, noise_seed, add_noise == "enable", cfg, positive, negative, latent_image)

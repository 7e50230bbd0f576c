"""KSampler and KSamplerAdvanced: one denoiser wrapper in sigma space and ComfyUI's samplers.

The loop is ComfyUI's: the latent enters the model's space through the family's latent format, the
initial noise (``prepare_noise``) is mixed in by the model sampling's ``noise_scaling``, a sampler of
``k_samplers`` walks the sigmas calling ``Denoiser`` for x0, and the result leaves through
``inverse_noise_scaling`` and the latent format again. ``Denoiser`` holds what ComfyUI spreads over its
CFGGuider and KSamplerX0Inpaint: each conditioning of a list evaluated and averaged (ConditioningCombine),
conditionings limited to a part of the schedule (ConditioningSetTimestepRange), classifier-free guidance
in one batch (skipped at cfg 1 unless a CFG++ sampler needs the unconditional prediction), a noise mask
that keeps the unmasked latent (inpainting), and the extra input channels of inpainting models. What the
network is given and how its output becomes x0 are the family's and the model sampling's business.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.graph.samplers import SAMPLERS
from tui_diffusion.pipeline import k_samplers
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.controlnet import control_inputs, with_uncond_controls
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.gligen import attached as gligen_attached
from tui_diffusion.pipeline.gligen import with_gligen
from tui_diffusion.pipeline.hypernetwork import applied as hypernetworks_applied
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.nodes_conditioning import entry_area, entry_weight, needs_areas, resolve_entries
from tui_diffusion.pipeline.placement import in_use
from tui_diffusion.pipeline.previews import choose_previewer
from tui_diffusion.pipeline.sampling import prepare_noise
from tui_diffusion.pipeline.schedules import advanced_sigmas, ksampler_sigmas
from tui_diffusion.pipeline.step_cache import StepCache, step_cache_applied

__all__ = ["Denoiser", "ksampler", "ksampler_advanced", "latent_preview", "prepare_noise", "run_sampler"]


def latent_preview(latent: torch.Tensor, latent_format: LatentFormat) -> np.ndarray:
    """A rough RGB image of a model-space latent (what the sampler sees), from the family's latent-to-RGB
    factors, which ComfyUI's previewer applies to the same space."""
    x = latent[0].float().cpu()
    factors = torch.tensor(latent_format.rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", x, factors) + torch.tensor(latent_format.rgb_bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


class _Conds:
    """A conditioning list with each entry's sigma window."""

    def __init__(self, conds: list, ms: Any, name: str) -> None:
        if not conds:
            raise NodeError(f"{name}: empty conditioning")
        self.entries = []
        for emb, extras in conds:
            high = ms.percent_to_sigma(extras.get("timestep_start", 0.0))
            low = ms.percent_to_sigma(extras.get("timestep_end", 1.0))
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


class Denoiser:
    """x0 for a noisy model-space latent at a sigma: the one model wrapper every sampler calls.

    ``latent`` and ``noise`` (model space) are what a noise mask keeps outside the mask, noised to the
    current sigma on the way in and clean on the way out, as ComfyUI's KSamplerX0Inpaint does.
    """

    def __init__(self, model: ModelHandle, positive: list, negative: list | None, cfg: float, latent: torch.Tensor,
                 noise: torch.Tensor, mask: torch.Tensor | None, need_uncond: bool = False) -> None:
        self.model = model
        self.family = model.family
        self.model_sampling = model.model_sampling
        dev = model.device
        self.device, self.dtype = dev.torch_device, dev.dtype
        self.cfg = cfg
        self.use_uncond = negative is not None and (need_uncond or not math.isclose(cfg, 1.0))
        negative = with_uncond_controls(positive, negative)  # ControlNetApply's controls reach the negative too
        #: area, strength or mask entries (ConditioningSetArea*, SetMask): each evaluated on its own crop
        self.areas = needs_areas(positive + (negative if self.use_uncond else []))
        if self.areas:
            positive, negative = resolve_entries(positive, negative if self.use_uncond else None,
                                                 tuple(latent.shape[-2:]))
        self.pos = _Conds(positive, self.model_sampling, "positive")
        self.neg = _Conds(negative, self.model_sampling, "negative") if self.use_uncond else None
        self.latent_shape = tuple(latent.shape)
        self.family.check_conditioning(model, [c for c, _, _ in self.pos.entries + (self.neg.entries if self.neg
                                                                                     else [])])
        self.mask = mask.to(self.device) if mask is not None else None
        self.keep = latent.to(self.device)
        self.noise = noise.to(self.device)
        concat = self.family.extra_channels(model, latent, mask)
        self.concat = concat.to(self.device, self.dtype) if concat is not None else None
        #: the unconditional x0 of the last call (CFG++ samplers); None without an unconditional branch
        self.uncond_denoised: torch.Tensor | None = None
        #: the whole schedule, for a model's mask function (DifferentialDiffusion)
        self.sigmas: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ms = self.model_sampling
        mask = self.mask
        mask_fn = self.model.denoise_mask_function
        if mask is not None and mask_fn is not None and self.sigmas is not None:
            mask = mask_fn(sigma, mask, self.sigmas, ms)
        if mask is not None:  # outside the mask the latent stays the input latent at this noise level
            x = x * mask + ms.noise_scaling(sigma, self.noise, self.keep) * (1 - mask)
        s = float(sigma.reshape(-1)[0])
        conds = self.pos.active(s)
        unconds = self.neg.active(s) if self.neg is not None else []
        if self.areas:
            return self._finish(*self._area_x0(x, sigma, conds, unconds), mask)
        entries = unconds + conds
        n = len(entries)
        batch = x.shape[0]
        kwargs = self.family.model_kwargs(self.model, entries, batch=batch, latent_shape=self.latent_shape,
                                          negative=[i < len(unconds) for i in range(n)], device=self.device,
                                          dtype=self.dtype)
        x_all = torch.cat([x] * n)
        sigma_all = torch.cat([sigma.to(x.device)] * n)
        x_in = ms.calculate_input(sigma_all, x_all).to(self.dtype)
        if self.concat is not None:
            x_in = torch.cat([x_in, self.concat.repeat(n, 1, 1, 1)], dim=1)
        timestep = ms.timestep(sigma_all).to(self.device).float()
        kwargs.update(control_inputs(self.model, entries, x_in[:, : x.shape[1]], timestep, s, kwargs, batch))
        with_gligen(kwargs, entries, tuple(x.shape[-2:]), batch, self.device, self.dtype)  # GLIGENTextBoxApply
        out = self.family.apply_model(self.model, x_in, timestep, kwargs).float().chunk(n)
        # Averaging and CFG act on the raw outputs: the output -> x0 map is affine with the same coefficients
        # for every row, so this equals ComfyUI's CFG on x0, with diffusers' rounding (eps/v/flow alike).
        cond = torch.stack(out[len(unconds):]).mean(0)
        uncond = None
        if unconds:
            uncond_out = torch.stack(out[: len(unconds)]).mean(0)
            uncond = ms.calculate_denoised(sigma, uncond_out, x)
            cond = uncond_out + (cond - uncond_out) * self.cfg
        result = ms.calculate_denoised(sigma, cond, x)
        return self._finish(result, uncond, mask)

    def _area_x0(self, x: torch.Tensor, sigma: torch.Tensor, conds: list,
                 unconds: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ComfyUI's ``calc_cond_batch``: each entry predicts x0 on its crop of the latent, and a side's
        predictions are averaged weighted by ``entry_weight`` (0 where no entry of it reaches), then CFG."""
        ms = self.model_sampling
        dims = (x.shape[-2], x.shape[-1])
        batch = x.shape[0]
        s = float(sigma.reshape(-1)[0])

        def side(entries: list, negative: bool) -> torch.Tensor:
            total = torch.zeros_like(x)
            counts = torch.full_like(x, 1e-37)
            for entry in entries:
                area = entry_area(entry[1], dims)
                crop, concat = x, self.concat
                if area is not None:
                    h, w, y, x0 = area
                    crop = x[:, :, y: y + h, x0: x0 + w]
                    concat = concat[:, :, y: y + h, x0: x0 + w] if concat is not None else None
                kwargs = self.family.model_kwargs(self.model, [entry], batch=batch, latent_shape=tuple(crop.shape),
                                                  negative=[negative], device=self.device, dtype=self.dtype)
                x_in = ms.calculate_input(sigma, crop).to(self.dtype)
                if concat is not None:
                    x_in = torch.cat([x_in, concat], dim=1)
                timestep = ms.timestep(sigma.reshape(-1).expand(batch)).to(self.device).float()
                kwargs.update(control_inputs(self.model, [entry], x_in[:, : crop.shape[1]], timestep, s, kwargs,
                                             batch))
                with_gligen(kwargs, [entry], tuple(crop.shape[-2:]), batch, self.device, self.dtype)
                pred = ms.calculate_denoised(sigma, self.family.apply_model(self.model, x_in, timestep,
                                                                            kwargs).float(), crop)
                mult = entry_weight(entry[1], crop, area, dims)
                if area is None:
                    total += pred * mult
                    counts += mult
                else:
                    h, w, y, x0 = area
                    total[:, :, y: y + h, x0: x0 + w] += pred * mult
                    counts[:, :, y: y + h, x0: x0 + w] += mult
            return total / counts

        cond = side(conds, False)
        if not unconds:
            return cond, None
        uncond = side(unconds, True)
        return uncond + (cond - uncond) * self.cfg, uncond

    def _finish(self, result: torch.Tensor, uncond: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:  # outside the mask the prediction is the input latent itself
            result = result * mask + self.keep * (1 - mask)
            if uncond is not None:
                uncond = uncond * mask + self.keep * (1 - mask)
        self.uncond_denoised = uncond
        return result


def _step_cache(ctx: NodeContext, model: ModelHandle) -> StepCache | None:
    """The model's step cache (ApplyStepCache), else the ``step_cache`` setting's, else none."""
    if model.step_cache is not None:
        return model.step_cache
    method = getattr(ctx.engine, "step_cache", "none")  # no engine: a sampler called on its own (benchmarks)
    return StepCache(method) if method != "none" else None


def run_sampler(ctx: NodeContext, model: ModelHandle, sampler_name: str, sigmas: torch.Tensor, noise_seed: int,
                add_noise: bool, positive: list, negative: list | None, cfg: float, latent_image: dict,
                denoised_out: dict | None = None) -> dict:
    """Sample ``latent_image`` along ``sigmas`` with one of ComfyUI's samplers (KSampler, KSamplerAdvanced and
    the custom sampling nodes all end here). ``negative`` None: no unconditional branch (BasicGuider).
    ``denoised_out`` receives the last step's denoised prediction (model space) under ``"x0"``."""
    if sampler_name not in SAMPLERS:
        raise NodeError(f"unknown sampler {sampler_name!r}")
    if len(sigmas) < 2:
        return {**latent_image, "samples": latent_image["samples"].clone()}
    with in_use(model.unet), patched({"unet": model.unet}, list(model.patches)), \
            hypernetworks_applied(model.unet, list(model.attention_patches), model.device.torch_device,
                                  model.device.dtype), gligen_attached(model, positive + (negative or [])), \
            step_cache_applied(model.unet, _step_cache(ctx, model)):
        return _run(ctx, model, sampler_name, sigmas, noise_seed, add_noise, positive, negative, cfg, latent_image,
                    denoised_out if denoised_out is not None else {})


@torch.inference_mode()
def _run(ctx: NodeContext, model: ModelHandle, sampler_name: str, sigmas: torch.Tensor, seed: int, add_noise: bool,
         positive: list, negative: list | None, cfg: float, latent_image: dict, denoised_out: dict) -> dict:
    fmt = model.family.latent_format
    samples = latent_image["samples"].float()
    if samples.shape[1] != fmt.channels and not bool(samples.any()):
        # an empty latent of another family (EmptyLatentImage's 4 channels before Flux) is resized, as ComfyUI does
        samples = samples.new_zeros((samples.shape[0], fmt.channels, *samples.shape[2:]))
    if samples.shape[1] != fmt.channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels but a {model.family.label} model takes "
                        f"{fmt.channels}")
    ms = model.model_sampling
    # an empty latent stays zeros, as in ComfyUI (its shift would otherwise move "nothing" for SD3/Flux)
    latent = fmt.process_in(samples) if bool(samples.any()) else samples
    noise = (prepare_noise(latent, seed, latent_image.get("batch_index")) if add_noise
             else torch.zeros_like(latent))
    mask = _mask_for(latent_image, latent.shape)
    from tui_diffusion.pipeline.clip_vision import resolve_unclip  # unCLIPConditioning, noised with this seed

    positive, negative = resolve_unclip(model, positive, seed), resolve_unclip(model, negative, seed)
    denoiser = Denoiser(model, positive, negative, cfg, latent, noise, mask,
                        need_uncond=SAMPLERS[sampler_name].cfg_pp)
    dev = model.device.torch_device
    sigmas = sigmas.float()
    denoiser.sigmas = sigmas.to(dev)
    x = ms.noise_scaling(sigmas[0], noise, latent, ms.is_max_denoise(float(sigmas[0]))).to(dev)
    total = len(sigmas) - 1

    previewer = choose_previewer(ctx.engine, fmt, ctx.engine.preview_method) if ctx.want_previews else None

    def callback(i: int, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> None:
        ctx.check_interrupt()
        denoised_out["x0"] = denoised
        # made only when the worker sends it (at most every 250 ms): a TAESD decode is not free
        ctx.report(i + 1, total, (lambda d=denoised: previewer(d)) if previewer is not None else None)

    ctx.check_interrupt()
    out = k_samplers.sample(sampler_name, denoiser, x, sigmas.to(dev), seed=seed, callback=callback)
    out = ms.inverse_noise_scaling(sigmas[-1], out.float().cpu())
    return {**latent_image, "samples": fmt.process_out(out)}


def ksampler(ctx: NodeContext, model: ModelHandle, seed: int, steps: int, cfg: float, sampler_name: str,
             scheduler: str, positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> dict:
    if denoise <= 0:
        return {**latent_image, "samples": latent_image["samples"].clone()}
    sigmas = ksampler_sigmas(model.model_sampling, sampler_name, scheduler, steps, denoise)
    return run_sampler(ctx, model, sampler_name, sigmas, seed, True, positive, negative, cfg, latent_image)


def ksampler_advanced(ctx: NodeContext, model: ModelHandle, add_noise: str, noise_seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, positive: list, negative: list, latent_image: dict,
                      start_at_step: int = 0, end_at_step: int = 10000,
                      return_with_leftover_noise: str = "disable") -> dict:
    sigmas = advanced_sigmas(model.model_sampling, sampler_name, scheduler, steps, start_at_step, end_at_step,
                             force_full_denoise=return_with_leftover_noise != "enable")
    return run_sampler(ctx, model, sampler_name, sigmas, noise_seed, add_noise == "enable", positive, negative, cfg,
                       latent_image)

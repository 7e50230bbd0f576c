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

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.models import ModelHandle, unet_call
from tui_diffusion.pipeline.placement import in_use
from tui_diffusion.pipeline.sampling import (
    ModelSampling,
    PreparedSampler,
    advanced_sigmas,
    initial_latent,
    prepare_sampler,
    step_generator,
)

# Latent -> RGB approximations (ComfyUI's latent_rgb_factors and bias), for live previews.
_LATENT_RGB = {
    "sd1": (torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                          [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]), torch.zeros(3)),
    "sdxl": (torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                           [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]),
             torch.tensor([0.1084, -0.0175, -0.0011])),
}


def latent_preview(latent: torch.Tensor, family: str = "sd1") -> np.ndarray:
    factors, bias = _LATENT_RGB["sdxl" if family.startswith("sdxl") else "sd1"]
    rgb = torch.einsum("chw,cr->hwr", latent[0].float().cpu(), factors) + bias
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


# The latent of a mid-grey image ("nothing here") per channel, as ComfyUI fills an inpainting model's
# masked-image input when the latent carries no mask.
_BLANK_INPAINT = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).reshape(1, 4, 1, 1)


def _inpaint_concat(model: ModelHandle, latent_image: dict, mask: torch.Tensor | None) -> torch.Tensor | None:
    """An inpainting UNet's extra input channels: the mask, then the masked image's latent."""
    latent = latent_image["samples"].float()
    extra = model.unet.config.in_channels - latent.shape[1]
    if extra <= 0:
        return None
    if extra != 5:
        raise NodeError(f"a UNet with {model.unet.config.in_channels} input channels is not an inpainting model "
                        "this sampler knows")
    if mask is None:
        return torch.cat([torch.ones_like(latent[:, :1]), _BLANK_INPAINT.expand_as(latent)], dim=1)
    return torch.cat([mask[:, :1].cpu(), latent], dim=1)


def _check_fits(model: ModelHandle, entries: list[tuple[torch.Tensor, dict]], sdxl: bool) -> None:
    """Conditioning from another model family fails here, with a message, not deep inside the UNet."""
    config = model.unet.config
    for emb, extras in entries:
        if emb.shape[-1] != config.cross_attention_dim:
            raise NodeError(f"the conditioning is {emb.shape[-1]} wide but this model takes "
                            f"{config.cross_attention_dim}: encode the prompts with this checkpoint's CLIP")
        if sdxl:
            pooled = extras.get("pooled_output")
            numbers = 5 if model.family == "sdxl-refiner" else 6
            want = config.projection_class_embeddings_input_dim - numbers * config.addition_time_embed_dim
            if pooled is None or pooled.shape[-1] != want:
                raise NodeError("an SDXL model needs conditioning from an SDXL CLIP (pooled output of width "
                                f"{want})")


def _size_conditioning(extras: dict, latent: torch.Tensor, refiner: bool, negative: bool) -> list[float]:
    """SDXL's size numbers; by default the image size, as ComfyUI derives it from the latent. The refiner
    takes an aesthetic score instead of the target size (ComfyUI's defaults: 6, and 2.5 for negatives)."""
    height, width = extras.get("height", latent.shape[-2] * 8), extras.get("width", latent.shape[-1] * 8)
    if refiner:
        score = extras.get("aesthetic_score", 2.5 if negative else 6.0)
        return [height, width, extras.get("crop_h", 0), extras.get("crop_w", 0), score]
    return [height, width, extras.get("crop_h", 0), extras.get("crop_w", 0),
            extras.get("target_height", height), extras.get("target_width", width)]


def _common_length(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat prompts of different window counts to a common length, as ComfyUI does."""
    lengths = {e.shape[1] for e in embeddings}
    if len(lengths) == 1:
        return embeddings
    lcm = math.lcm(*lengths)
    return [e.repeat(1, lcm // e.shape[1], 1) for e in embeddings]


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
    unet = unet_call(model.unet, any(p.strength != 0.0 for p in model.patches))
    ms = ModelSampling.from_scheduler_config(model.scheduler_config)
    latent = latent_image["samples"].float()
    noise = (prepare_noise(latent, seed, latent_image.get("batch_index")) if add_noise
             else torch.zeros_like(latent))
    x = initial_latent(prepared, latent, noise, ms.sigma_max).to(dev.torch_device)
    mask = _mask_for(latent_image, latent.shape)
    if mask is not None:
        mask, keep, noise_dev = mask.to(dev.torch_device), latent.to(dev.torch_device), noise.to(dev.torch_device)

    concat = _inpaint_concat(model, latent_image, mask)
    if concat is not None:
        concat = concat.to(dev.torch_device, dev.dtype)
    pos, neg = _Conds(positive, ms, "positive"), _Conds(negative, ms, "negative")
    use_cfg = not math.isclose(cfg, 1.0)
    batch = latent.shape[0]
    extra: dict[str, Any] = {"return_dict": False}
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = step_generator(seed)
    vp = prepared.space in ("vp", "own")
    sdxl = model.family.startswith("sdxl")
    refiner = model.family == "sdxl-refiner"
    v_pred = model.scheduler_config.get("prediction_type") == "v_prediction"
    _check_fits(model, [c for c, _, _ in pos.entries + neg.entries], sdxl)

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
        contexts = _common_length([emb for emb, _ in entries])
        context = torch.cat([c.to(dev.torch_device, dev.dtype).expand(batch, -1, -1) for c in contexts])
        kwargs: dict[str, Any] = {}
        if sdxl:
            pooled = [extras["pooled_output"].expand(batch, -1) for _, extras in entries]
            sizes = [torch.tensor([_size_conditioning(extras, latent, refiner, i < len(unconds))]).expand(batch, -1)
                     for i, (_, extras) in enumerate(entries)]
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat(pooled).to(dev.torch_device, dev.dtype),
                                           "time_ids": torch.cat(sizes).to(dev.torch_device, dev.dtype)}
        x_in = sched.scale_model_input(torch.cat([x] * len(contexts)), t).to(dev.dtype)
        if concat is not None:
            x_in = torch.cat([x_in, concat.repeat(len(contexts), 1, 1, 1)], dim=1)
        out = unet(x_in, t.to(dev.torch_device), encoder_hidden_states=context, return_dict=False,
                   **kwargs)[0].float()
        parts = out.chunk(len(contexts))
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
            preview = latent_preview(denoised, model.family)
        ctx.report(i + 1, total, preview)
    end = float(prepared.sigmas[-1])
    if vp and end > 0:
        x = x * math.sqrt(1 + end * end)  # hand leftover noise on in ComfyUI's (k-diffusion) scale
    return {**latent_image, "samples": x.float().cpu()}


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

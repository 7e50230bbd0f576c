"""Implementations of the core nodes, looked up by class_type.

Each takes the node's inputs as keyword arguments (links already resolved to upstream outputs)
and returns a NodeResult: the outputs, in the order the node's spec declares them, and the files
it wrote. Data types follow ComfyUI: LATENT is ``{"samples": tensor[B,4,h,w]}``, IMAGE is a float
tensor ``[B,H,W,3]`` in 0..1, CONDITIONING is ``[[embeddings, {extras}], ...]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from tui_diffusion.paths import PathError
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle, VaeHandle, load_checkpoint
from tui_diffusion.pipeline.prompt_weights import weighted_chunks
from tui_diffusion.pipeline.sampling import ModelSampling, initial_latent, noise_for, prepare_sampler, step_generator
from tui_diffusion.store.outputs import save_png


@dataclass
class NodeResult:
    outputs: tuple[Any, ...] = ()
    files: list[str] = field(default_factory=list)


NodeFn = Callable[..., NodeResult]
IMPLEMENTATIONS: dict[str, NodeFn] = {}


def node(class_type: str) -> Callable[[NodeFn], NodeFn]:
    def register(fn: NodeFn) -> NodeFn:
        IMPLEMENTATIONS[class_type] = fn
        return fn

    return register


# -- loaders ----------------------------------------------------------------------------------------------
@node("CheckpointLoaderSimple")
def checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    eng = ctx.engine
    try:
        path = eng.paths.resolve("checkpoints", ckpt_name)
    except PathError as exc:
        raise NodeError(str(exc)) from None
    key = repr((eng.paths.fingerprint("checkpoints", ckpt_name), str(eng.device.torch_device), str(eng.device.dtype)))
    loaded = eng.models.get(key, lambda: load_checkpoint(path, eng.device, eng.config_cache))
    return NodeResult((loaded.model, loaded.clip, loaded.vae))


# -- conditioning -------------------------------------------------------------------------------------------
def _text_transformer(encoder: Any) -> Any:
    # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
    return getattr(encoder, "text_model", encoder)


@torch.inference_mode()
def encode_text(clip: ClipHandle, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's CLIPTextEncode: weighted tokens in 75-token windows, hidden states of the chosen layer.

    A token of weight w moves its embedding away from the empty prompt's: z' = z_empty + w (z - z_empty).
    Returns the embeddings [1, tokens, width] and the first window's pooled output.
    """
    tok = clip.tokenizer
    context = clip.text_encoder.config.max_position_embeddings
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = weighted_chunks(text, lambda word: tok(word, add_special_tokens=False).input_ids,
                             tok.bos_token_id, tok.eos_token_id, pad, context)
    weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32)
    rows = [[t for t, _ in c] for c in chunks]
    weighted = bool((weights != 1.0).any())
    if weighted:
        rows.append([tok.bos_token_id, tok.eos_token_id] + [pad] * (context - 2))
    ids = torch.tensor(rows, dtype=torch.long, device=clip.device.torch_device)
    out = clip.text_encoder(ids, output_hidden_states=clip.layer != -1)
    if clip.layer == -1:
        hidden = out.last_hidden_state
    else:
        hidden = _text_transformer(clip.text_encoder).final_layer_norm(out.hidden_states[clip.layer])
    hidden = hidden.float().cpu()
    pooled = out.pooler_output[:1].float().cpu()
    if weighted:
        empty, hidden = hidden[-1:], hidden[:-1]
        hidden = empty + weights[..., None] * (hidden - empty)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


@node("CLIPTextEncode")
def clip_text_encode(ctx: NodeContext, text: str, clip: ClipHandle) -> NodeResult:
    embeddings, pooled = encode_text(clip, text)
    return NodeResult(([[embeddings, {"pooled_output": pooled}]],))


@node("CLIPSetLastLayer")
def clip_set_last_layer(ctx: NodeContext, clip: ClipHandle, stop_at_clip_layer: int = -1) -> NodeResult:
    layers = clip.text_encoder.config.num_hidden_layers
    if -stop_at_clip_layer > layers:
        raise NodeError(f"stop_at_clip_layer {stop_at_clip_layer}: this text encoder has {layers} layers")
    return NodeResult((dataclasses.replace(clip, layer=stop_at_clip_layer),))


# -- latents ---------------------------------------------------------------------------------------------------
@node("EmptyLatentImage")
def empty_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1) -> NodeResult:
    return NodeResult(({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},))


# SD1.x latent -> RGB approximation (ComfyUI's latent_rgb_factors), for live previews.
_LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                            [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]])


def latent_preview(latent: torch.Tensor) -> np.ndarray:
    rgb = torch.einsum("chw,cr->hwr", latent[0].float().cpu(), _LATENT_RGB)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def _embeddings(cond: list, name: str) -> torch.Tensor:
    if not cond:
        raise NodeError(f"{name}: empty conditioning")
    return torch.cat([c[0] for c in cond], dim=1) if len(cond) > 1 else cond[0][0]


def _match_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different chunk counts are repeated to a common length, as ComfyUI does."""
    if a.shape[1] == b.shape[1]:
        return a, b
    lcm = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, lcm // a.shape[1], 1), b.repeat(1, lcm // b.shape[1], 1)


def _step_kwargs(scheduler: Any) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


@node("KSampler")
@torch.inference_mode()
def ksampler(ctx: NodeContext, model: ModelHandle, seed: int, steps: int, cfg: float, sampler_name: str,
             scheduler: str, positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> NodeResult:
    latent = latent_image["samples"].float()
    if denoise <= 0:
        return NodeResult(({**latent_image, "samples": latent.clone()},))
    dev = model.device
    prepared = prepare_sampler(sampler_name, scheduler, steps, denoise, model.scheduler_config, seed)
    sched = prepared.scheduler
    noise = noise_for(seed, tuple(latent.shape))
    ms = ModelSampling.from_scheduler_config(model.scheduler_config)
    x = initial_latent(prepared, latent, noise, ms.sigma_max).to(dev.torch_device)

    cond, uncond = _match_length(_embeddings(positive, "positive"), _embeddings(negative, "negative"))
    batch = latent.shape[0]
    cond = cond.to(dev.torch_device, dev.dtype).expand(batch, -1, -1)
    uncond = uncond.to(dev.torch_device, dev.dtype).expand(batch, -1, -1)
    use_cfg = not math.isclose(cfg, 1.0)
    context = torch.cat([uncond, cond]) if use_cfg else cond
    accepts = _step_kwargs(sched)
    extra: dict[str, Any] = {"return_dict": False}
    if "generator" in accepts:
        extra["generator"] = step_generator(seed)

    timesteps = sched.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        ctx.check_interrupt()
        x_in = torch.cat([x, x]) if use_cfg else x
        x_in = sched.scale_model_input(x_in, t).to(dev.dtype)
        out = model.unet(x_in, t.to(dev.torch_device), encoder_hidden_states=context, return_dict=False)[0].float()
        if use_cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + cfg * (out_cond - out_uncond)
        step = sched.step(out, t, x, **extra)
        x = step[0]
        preview = None
        if ctx.want_previews:
            denoised = step[1] if len(step) > 1 and isinstance(step[1], torch.Tensor) else x
            preview = latent_preview(denoised)
        ctx.report(i + 1, total, preview)
    return NodeResult(({**latent_image, "samples": x.float().cpu()},))


# -- images ------------------------------------------------------------------------------------------------------
@node("VAEDecode")
@torch.inference_mode()
def vae_decode(ctx: NodeContext, samples: dict, vae: VaeHandle) -> NodeResult:
    z = samples["samples"].to(vae.device.torch_device, vae.device.vae_dtype) / vae.scaling_factor
    images = []
    for i in range(z.shape[0]):  # one at a time: decoding is the memory peak
        ctx.check_interrupt()
        img = vae.vae.decode(z[i:i + 1], return_dict=False)[0]
        images.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
    return NodeResult((torch.cat(images).permute(0, 2, 3, 1).contiguous(),))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = images.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


@node("SaveImage")
def save_image(ctx: NodeContext, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> NodeResult:
    files = []
    for img in to_pil(images):
        try:
            path = save_png(img, ctx.engine.output_dir, filename_prefix, {"prompt": ctx.workflow})
        except PathError as exc:
            raise NodeError(str(exc)) from None
        files.append(str(path))
    return NodeResult((), files)


@node("PreviewImage")
def preview_image(ctx: NodeContext, images: torch.Tensor) -> NodeResult:
    prefix = "ComfyUI_temp_" + secrets.token_hex(3)
    files = [str(save_png(img, ctx.engine.temp_dir, prefix, {"prompt": ctx.workflow})) for img in to_pil(images)]
    return NodeResult((), files)


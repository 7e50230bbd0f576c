"""Implementations of the core nodes, looked up by class_type.

Each takes the node's inputs as keyword arguments (links already resolved to upstream outputs)
and returns a NodeResult: the outputs, in the order the node's spec declares them, and the files
it wrote. Data types follow ComfyUI: LATENT is ``{"samples": tensor[B,4,h,w]}``, IMAGE is a float
tensor ``[B,H,W,3]`` in 0..1, CONDITIONING is ``[[embeddings, {extras}], ...]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tui_diffusion.paths import PathError
from tui_diffusion.pipeline import ksampler as sampling_nodes
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.embeddings import PREFIX as EMBEDDING_PREFIX
from tui_diffusion.pipeline.embeddings import find_embedding, load_vectors
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lora import LoraWeights, Patch, load_lora, matched_modules, patched
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle, TextEncoder, VaeHandle, load_checkpoint
from tui_diffusion.pipeline.placement import in_use
from tui_diffusion.pipeline.prompt_weights import weighted_chunks
from tui_diffusion.pipeline.registry import NodeResult, node
from tui_diffusion.store.outputs import save_png


# -- loaders ----------------------------------------------------------------------------------------------
@node("CheckpointLoaderSimple")
def checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("checkpoints", ckpt_name)
    loaded = eng.models.get(key, lambda: load_checkpoint(path, eng.device, eng.config_cache, eng.allow_pickle))
    clip = dataclasses.replace(loaded.clip, embeddings_dir=eng.paths.folder("embeddings"),
                               allow_pickle=eng.allow_pickle)
    return NodeResult((loaded.model, clip, loaded.vae))


# -- conditioning -------------------------------------------------------------------------------------------
def _text_transformer(encoder: Any) -> Any:
    # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
    return getattr(encoder, "text_model", encoder)


@torch.inference_mode()
def _encode_one(enc: TextEncoder, text: str, layer: int, device: Any, embeddings_dir: Path | None = None,
                index: int = 0, allow_pickle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    tok = enc.tokenizer
    context = enc.model.config.max_position_embeddings
    width = enc.model.config.hidden_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def tokenize(word: str) -> list[Any]:
        if word.startswith(EMBEDDING_PREFIX):
            name = word[len(EMBEDDING_PREFIX):].rstrip(",")
            return list(load_vectors(find_embedding(embeddings_dir, name), width, index, allow_pickle))
        return tok(word, add_special_tokens=False).input_ids

    chunks = weighted_chunks(text, tokenize, tok.bos_token_id, tok.eos_token_id, pad, context)
    weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32)
    # embedding vectors take a placeholder id; a hook on the token embedding puts the vectors in its place
    rows = [[t if isinstance(t, int) else pad for t, _ in c] for c in chunks]
    vectors = [(r, i, t) for r, c in enumerate(chunks) for i, (t, _) in enumerate(c) if not isinstance(t, int)]
    weighted = bool((weights != 1.0).any())
    if weighted:
        rows.append([tok.bos_token_id, tok.eos_token_id] + [pad] * (context - 2))
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    with _embedding_vectors(enc.model, vectors):
        out = enc.model(ids, output_hidden_states=layer != -1)
    if layer == -1:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[layer]
        if enc.norm_hidden:
            hidden = _text_transformer(enc.model).final_layer_norm(hidden)
    hidden = hidden.float().cpu()
    pooled = getattr(out, "text_embeds", None)
    pooled = (pooled if pooled is not None else out.pooler_output)[:1].float().cpu()
    if weighted:
        empty, hidden = hidden[-1:], hidden[:-1]
        hidden = empty + weights[..., None] * (hidden - empty)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


@contextlib.contextmanager
def _embedding_vectors(model: Any, vectors: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
    if not vectors:
        yield
        return

    def replace(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, col, vector in vectors:
            output[row, col] = vector.to(output.device, output.dtype)
        return output

    handle = _text_transformer(model).embeddings.token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_text(clip: ClipHandle, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPTextEncode's encoding; a CLIP with its own (SD3/Flux's ``models_dit.DitClip``, which adds T5) uses it."""
    own = getattr(clip, "encode_prompt", None)
    if own is not None:
        with patched(clip.parts(), list(clip.patches)):
            return own(text)
    with in_use(*clip.parts().values()), patched(clip.parts(), list(clip.patches)):
        return _encode_all(clip, text)


def _encode_all(clip: ClipHandle, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's CLIPTextEncode: weighted tokens in 75-token windows, hidden states of the chosen layer.

    A token of weight w moves its embedding away from the empty prompt's: z' = z_empty + w (z - z_empty).
    With two encoders (SDXL) their outputs are concatenated along the features. Returns the embeddings
    [1, tokens, width] and the pooled output (SDXL: the bigG encoder's projection; else the first's).
    """
    results = [_encode_one(enc, text, clip.layer, clip.device.torch_device, clip.embeddings_dir, i, clip.allow_pickle)
               for i, enc in enumerate(clip.encoders)]
    embeddings = torch.cat([r[0] for r in results], dim=-1)
    pooled_index = next((i for i, e in enumerate(clip.encoders) if e.pooled), 0)
    return embeddings, results[pooled_index][1]


@node("CLIPTextEncode")
def clip_text_encode(ctx: NodeContext, text: str, clip: ClipHandle) -> NodeResult:
    embeddings, pooled = encode_text(clip, text)
    return NodeResult(([[embeddings, {"pooled_output": pooled}]],))


@node("CLIPTextEncodeSDXL")
def clip_text_encode_sdxl(ctx: NodeContext, clip: ClipHandle, width: int, height: int, crop_w: int, crop_h: int,
                          target_width: int, target_height: int, text_g: str, text_l: str) -> NodeResult:
    if len(clip.encoders) != 2:
        raise NodeError("this CLIP is not an SDXL one (it has one text encoder); use CLIPTextEncode")
    dev = clip.device.torch_device
    with in_use(*clip.parts().values()), patched(clip.parts(), list(clip.patches)):
        hidden_l, _ = _encode_one(clip.encoders[0], text_l, clip.layer, dev, clip.embeddings_dir, 0,
                                  clip.allow_pickle)
        hidden_g, pooled = _encode_one(clip.encoders[1], text_g, clip.layer, dev, clip.embeddings_dir, 1,
                                       clip.allow_pickle)
        while hidden_l.shape[1] != hidden_g.shape[1]:  # pad the shorter prompt with empty windows, as ComfyUI
            short = 0 if hidden_l.shape[1] < hidden_g.shape[1] else 1
            empty, _ = _encode_one(clip.encoders[short], "", clip.layer, dev)
            if short == 0:
                hidden_l = torch.cat([hidden_l, empty], dim=1)
            else:
                hidden_g = torch.cat([hidden_g, empty], dim=1)
    extras = {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
              "target_width": target_width, "target_height": target_height}
    return NodeResult(([[torch.cat([hidden_l, hidden_g], dim=-1), extras]],))


@node("CLIPTextEncodeSDXLRefiner")
def clip_text_encode_sdxl_refiner(ctx: NodeContext, ascore: float, width: int, height: int, text: str,
                                  clip: ClipHandle) -> NodeResult:
    if not any(e.pooled for e in clip.encoders):
        raise NodeError("this CLIP has no pooled output (not an SDXL one)")
    embeddings, pooled = encode_text(clip, text)
    extras = {"pooled_output": pooled, "aesthetic_score": ascore, "width": width, "height": height}
    return NodeResult(([[embeddings, extras]],))


@node("CLIPSetLastLayer")
def clip_set_last_layer(ctx: NodeContext, clip: ClipHandle, stop_at_clip_layer: int = -1) -> NodeResult:
    layers = min(e.model.config.num_hidden_layers for e in clip.encoders)
    if -stop_at_clip_layer > layers:
        raise NodeError(f"stop_at_clip_layer {stop_at_clip_layer}: this text encoder has {layers} layers")
    return NodeResult((dataclasses.replace(clip, layer=stop_at_clip_layer),))


# -- latents ---------------------------------------------------------------------------------------------------
@node("EmptyLatentImage")
def empty_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int = 1) -> NodeResult:
    return NodeResult(({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},))


@node("KSampler")
def ksampler(ctx: NodeContext, **inputs: Any) -> NodeResult:
    return NodeResult((sampling_nodes.ksampler(ctx, **inputs),))


@node("KSamplerAdvanced")
def ksampler_advanced(ctx: NodeContext, **inputs: Any) -> NodeResult:
    return NodeResult((sampling_nodes.ksampler_advanced(ctx, **inputs),))


@node("ModelSamplingDiscrete")
def model_sampling_discrete(ctx: NodeContext, model: ModelHandle, sampling: str = "eps",
                            zsnr: bool = False) -> NodeResult:
    """What the model predicts (eps or v) on its own betas, optionally rescaled to zero terminal SNR; lcm: LCM's
    distilled schedule and prediction (an LCM model or LoRA), as ComfyUI's option of the same name."""
    from tui_diffusion.pipeline.model_sampling import DiscreteSampling, EDMSampling, LCMSampling

    if not isinstance(model.family.default_model_sampling(model), (DiscreteSampling, EDMSampling)):  # CosXL: EDM
        raise NodeError(f"a {model.family.label} model does not use discrete (eps/v) sampling")
    config = {**model.scheduler_config, "rescale_betas_zero_snr": zsnr}
    if sampling == "lcm":
        sampling_object: DiscreteSampling = LCMSampling.from_scheduler_config(config)
    else:
        sampling_object = DiscreteSampling.from_scheduler_config(config, {"eps": "eps", "v_prediction": "v"}[sampling])
    return NodeResult((dataclasses.replace(model, model_sampling_override=sampling_object),))


# -- LoRA ----------------------------------------------------------------------------------------------------------
def _lora(ctx: NodeContext, lora_name: str) -> LoraWeights:
    path, key = ctx.model_file("loras", lora_name)
    return ctx.engine.loras.get(key, lambda: load_lora(path))


def _with_patch(handle: Any, parts: dict[str, Any], lora: LoraWeights, strength: float, what: str) -> Any:
    if strength == 0.0:
        return handle  # a no-op, as in ComfyUI
    mine = [k for k in lora.pairs if k.split(":", 1)[0] in parts]
    fitting = matched_modules(parts, lora)
    if fitting == 0:
        raise NodeError(f"{Path(lora.source).name}: none of its layers belong to this {what} "
                        "(a LoRA for another model family?)")
    if fitting < len(mine):
        raise NodeError(f"{Path(lora.source).name}: only {fitting} of its {len(mine)} {what} layers fit this "
                        f"{what} (a LoRA for another model family?)")
    return dataclasses.replace(handle, patches=(*handle.patches, Patch(lora, strength)))


@node("LoraLoader")
def lora_loader(ctx: NodeContext, model: ModelHandle, clip: ClipHandle, lora_name: str, strength_model: float = 1.0,
                strength_clip: float = 1.0) -> NodeResult:
    lora = _lora(ctx, lora_name)
    unet_keys = any(k.startswith("unet:") for k in lora.pairs)
    clip_keys = any(k.startswith("te") for k in lora.pairs)
    new_model = _with_patch(model, {"unet": model.unet}, lora, strength_model, "model") if unet_keys else model
    new_clip = _with_patch(clip, clip.parts(), lora, strength_clip, "CLIP") if clip_keys else clip
    return NodeResult((new_model, new_clip))


@node("LoraLoaderModelOnly")
def lora_loader_model_only(ctx: NodeContext, model: ModelHandle, lora_name: str,
                           strength_model: float = 1.0) -> NodeResult:
    lora = _lora(ctx, lora_name)
    return NodeResult((_with_patch(model, {"unet": model.unet}, lora, strength_model, "model"),))


# -- images ------------------------------------------------------------------------------------------------------
@node("VAEDecode")
@torch.inference_mode()
def vae_decode(ctx: NodeContext, samples: dict, vae: VaeHandle) -> NodeResult:
    """LATENT is what the VAE encodes (unscaled), so any VAE of the latent's width decodes it."""
    z = samples["samples"]
    if z.shape[1] != vae.latent_channels:
        raise NodeError(f"the latent has {z.shape[1]} channels but this VAE takes {vae.latent_channels}: use the "
                        "VAE of the model family that made it")
    images = []
    with in_use(vae.vae):
        for i in range(z.shape[0]):  # one at a time: decoding is the memory peak
            ctx.check_interrupt()
            images.append((vae.decode(z[i:i + 1]) / 2 + 0.5).clamp(0, 1))
    return NodeResult((torch.cat(images).permute(0, 2, 3, 1).contiguous(),))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = images.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def _reproducibility(ctx: NodeContext) -> dict[str, Any]:
    """What re-making the image needs that other tools leave out."""
    import diffusers

    from tui_diffusion import __version__
    from tui_diffusion.pipeline.model_sampling import DiscreteSampling
    from tui_diffusion.pipeline.schedules import ksampler_sigmas

    dev = ctx.engine.device
    samplers = {}
    for node_id, entry_node in ctx.workflow.items():
        inputs = entry_node.get("inputs", {})
        name, scheduler = inputs.get("sampler_name"), inputs.get("scheduler")
        if entry_node.get("class_type") in ("KSampler", "KSamplerAdvanced") and isinstance(name, str):
            entry: dict[str, Any] = {"sampler_name": name, "scheduler": scheduler}
            if isinstance(inputs.get("steps"), int):
                with contextlib.suppress(ValueError):  # the sigmas of SD1.5's discrete schedule, for reference
                    sigmas = ksampler_sigmas(DiscreteSampling(), name, scheduler, inputs["steps"],
                                             float(inputs.get("denoise", 1.0)))
                    entry["sigmas"] = [round(float(x), 6) for x in sigmas]
            samplers[node_id] = entry
    return {
        "generator": f"tui-diffusion {__version__}",
        "device": f"{dev.torch_device} ({dev.name})", "dtype": str(dev.dtype).replace("torch.", ""),
        "vae_dtype": str(dev.vae_dtype).replace("torch.", ""),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "noise": "torch.randn of the whole batch on a CPU torch.Generator seeded with the seed; ancestral "
                 "samplers draw per-step noise from a CPU generator seeded with seed + 1, SDE samplers from a "
                 "torchsde Brownian tree seeded with the seed",
        "samplers": samplers,
    }


def _metadata(ctx: NodeContext, width: int, height: int) -> dict[str, Any]:
    from tui_diffusion import __version__
    from tui_diffusion.graph.a1111 import parameters_text, summary
    from tui_diffusion.graph.ui_format import api_to_ui

    chunks: dict[str, Any] = {"prompt": ctx.workflow, "workflow": api_to_ui(ctx.workflow)}
    info = summary(ctx.workflow, ctx.node_id)
    if info is not None:
        digest = ctx.engine.model_hash("checkpoints", info["model"]) if info.get("model") else None
        chunks["parameters"] = parameters_text(info, width, height, digest, f"tui-diffusion {__version__}")
    chunks["tui-diffusion"] = _reproducibility(ctx)
    return chunks


@node("SaveImage")
def save_image(ctx: NodeContext, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> NodeResult:
    files = []
    metadata = _metadata(ctx, images.shape[2], images.shape[1])
    for img in to_pil(images):
        try:
            path = save_png(img, ctx.engine.output_dir, filename_prefix, metadata)
        except PathError as exc:
            raise NodeError(str(exc)) from None
        except OSError as exc:  # a full disk, a folder that became read-only: the job fails, not the worker
            raise NodeError(f"cannot write the image into {ctx.engine.output_dir}: {exc.strerror or exc} "
                            f"({len(files)} of {images.shape[0]} written)") from None
        files.append(str(path))
    return NodeResult((), files)


@node("PreviewImage")
def preview_image(ctx: NodeContext, images: torch.Tensor) -> NodeResult:
    prefix = "ComfyUI_temp_" + secrets.token_hex(3)
    metadata = _metadata(ctx, images.shape[2], images.shape[1])
    files = [str(save_png(img, ctx.engine.temp_dir, prefix, metadata)) for img in to_pil(images)]
    return NodeResult((), files)


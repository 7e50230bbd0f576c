"""Flux.1 (dev, schnell, and the variants with the same transformer): CLIP-L's pooled output and T5-XXL's tokens,
a 16-channel VAE, Flux's flow sampling (the network is given sigma; dev shift 1.15, schnell 1.0) and, for dev,
an embedded guidance value (FluxGuidance; 3.5 unless set).

The variants with the same transformer take more input channels, built as ComfyUI's ``Flux.concat_cond`` does:
Canny/Depth (32 = 128/4 channels) the conditioning image's latent (``concat_latent_image``, set by
InstructPixToPixConditioning), Fill (96 = 384/4) that latent and the mask as 64 channels of 8x8 pixels
(``concat_mask`` from InpaintModelConditioning, else the latent's noise mask). Kontext takes reference latents
(ReferenceLatent's ``reference_latents``) as extra image tokens, placed as ComfyUI places them by the
conditioning's ``reference_latents_method`` (FluxKontextMultiReferenceLatentMethod): "offset" (the default) at index
1, each next reference right of or below the others; "index" at indices 1, 2, ...; "uxo" (USO/UNO) at index 0,
diagonally past the image and each other. Only the image's own tokens come out. USOStyleReference's tokens (the
MODEL's ``post_input_patches``) go before the embedded text tokens, at position 0, as ComfyUI's post-input patch
puts them: diffusers' transformer embeds the text itself, so they join through a hook on its ``context_embedder``
for the one call.

Files: Black Forest Labs' keys (``double_blocks.*``/``single_blocks.*``, no prefix) in ``diffusion_models/``, or an
all-in-one checkpoint with the transformer under ``model.diffusion_model.``, the VAE under ``vae.`` and the text
encoders under ``text_encoders.<clip_l|t5xxl>.transformer.``. Loading lives in ``pipeline/models_dit.py``.
"""

from __future__ import annotations

from typing import Any

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.families.sd3 import DiTFamily, batched, pad_to_patch, to_model_dtype
from tui_diffusion.modelfiles.convert_dit import FLUX_KEY

FLUX_LATENT = LatentFormat(
    channels=16, scale_factor=0.3611, shift_factor=0.1159,
    rgb_factors=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                 (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                 (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                 (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                 (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                 (-0.1262, -0.0982, -0.0778)),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
    taesd_decoder="taef1_decoder",
)
#: ComfyUI's defaults: Flux dev's model sampling shift, schnell's, and the guidance dev embeds unless told
DEV_SHIFT, SCHNELL_SHIFT, DEFAULT_GUIDANCE = 1.15, 1.0, 3.5


def pack(x: Any) -> Any:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: 2x2 patches as tokens, channels then rows then columns."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Any, h: int, w: int) -> Any:
    b, _, cp = tokens.shape
    c = cp // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Flux's positions of the image tokens: (0, row, column) for each 2x2 patch."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def input_channels(model: Any) -> int:
    """The transformer's input channels per latent cell (16, or 32 for Canny/Depth, 96 for Fill)."""
    return int(model.unet.config.in_channels) // 4


def concat_image(image: Any, shape: tuple, device: Any) -> Any:
    """A conditioning image's VAE latent in the model's space, resized to the latent (centre crop) and batch."""
    from tui_diffusion.pipeline.nodes_latent import common_upscale

    image = image.float().to(device)
    if tuple(image.shape[-2:]) != tuple(shape[-2:]):
        image = common_upscale(image, shape[-1], shape[-2], "bilinear", "center")
    return _to_batch(FLUX_LATENT.process_in(image), shape[0])


def concat_mask(mask: Any, shape: tuple, device: Any) -> Any:
    """A mask as Flux Fill reads it: averaged over channels, resized to 8x the latent, each latent cell's 8x8
    pixels as 64 channels (row-major)."""
    from tui_diffusion.pipeline.nodes_latent import common_upscale

    mask = mask.float().to(device)
    mask = mask.reshape(-1, 1, *mask.shape[-2:]) if mask.ndim < 4 else mask.mean(1, keepdim=True)
    h, w = shape[-2:]
    mask = common_upscale(mask, w * 8, h * 8, "bilinear", "center")
    mask = mask.reshape(mask.shape[0], h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(mask.shape[0], 64, h, w)
    return _to_batch(mask, shape[0])


def _to_batch(x: Any, batch: int) -> Any:
    """Repeat or cut a batch to ``batch`` rows (ComfyUI's resize_to_batch_size for the usual cases)."""
    if x.shape[0] == batch:
        return x
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:batch]


#: ComfyUI's reference-latent placements (the conditioning's ``reference_latents_method``); "offset" is Flux.1's
#: default. ComfyUI's fourth, "index_timestep_zero", modulates the reference tokens at timestep 0, which the
#: diffusers transformer's blocks cannot do per token: refused by name.
REFERENCE_METHODS = ("offset", "index", "uxo")


def reference_positions(refs: list[Any], method: str, grid: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(index, row offset, column offset) in tokens of each reference latent's ids, for a main image of ``grid``
    tokens (rows, columns); offsets in latent pixels become tokens rounding up, as ComfyUI's ``process_img``."""
    if method == "offset":
        return [(1, (h + 1) // 2, (w + 1) // 2) for h, w in reference_offsets(refs)]
    if method == "index":
        return [(i + 1, 0, 0) for i in range(len(refs))]
    if method == "uxo":  # each reference past the image and the references before it, on both axes
        out, h, w = [], 0, 0
        for ref in refs:
            out.append((0, (grid[0] * 2 + h + 1) // 2, (grid[1] * 2 + w + 1) // 2))
            h, w = h + int(ref.shape[-2]), w + int(ref.shape[-1])
        return out
    from tui_diffusion.pipeline.errors import NodeError

    if method == "index_timestep_zero":
        raise NodeError("reference_latents_method 'index_timestep_zero' (reference tokens modulated at timestep 0) "
                        "is not supported for Flux.1 here: use 'offset', 'index' or 'uxo/uno'")
    raise NodeError(f"unknown reference_latents_method {method!r}: one of {', '.join(REFERENCE_METHODS)}")


def reference_offsets(refs: list[Any]) -> list[tuple[int, int]]:
    """Latent-pixel offsets of reference latents, ComfyUI's "offset" method: each next reference goes right of
    the ones so far when it is taller than their extent, else below them."""
    h = w = 0
    out = []
    for ref in refs:
        rh, rw = ref.shape[-2:]
        h_off = w_off = 0
        if rh + h > rw + w:
            w_off = w
        else:
            h_off = h
        h, w = max(h, rh + h_off), max(w, rw + w_off)
        out.append((h_off, w_off))
    return out


class FluxFamily(DiTFamily):
    id = "flux"
    label = "Flux.1"
    resolution_shift = True
    post_input_tokens = True
    latent_format = FLUX_LATENT
    text_encoders = ("clip_l", "t5xxl")
    probe = FLUX_KEY
    required_text_encoders = ("clip_l", "t5xxl")
    vae_prefix = "vae."

    def original_keys(self, state: dict[str, Any], config: Any, prefix: str) -> dict[str, Any]:
        from tui_diffusion.pipeline.checkpoint_writer_dit import flux_to_original

        return flux_to_original(state, int(config.num_layers), int(config.num_single_layers), prefix)

    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        """Flux's context is T5's tokens: conditioning of another width (CLIP hidden states) is refused."""
        from tui_diffusion.pipeline.errors import NodeError

        super().check_conditioning(model, entries)
        width = int(model.unet.config.joint_attention_dim)
        for emb, _ in entries:
            if emb.shape[-1] != width:
                raise NodeError(f"a Flux model takes T5's tokens ({width} wide) as its context, not {emb.shape[-1]}: "
                                "encode the prompts with Flux's text encoders (DualCLIPLoader, type flux)")

    def default_model_sampling(self, model: Any) -> Any:
        from tui_diffusion.pipeline.model_sampling import FluxSampling

        return FluxSampling(shift=DEV_SHIFT if model.unet.config.guidance_embeds else SCHNELL_SHIFT)

    def control_kwargs(self, model: Any, residuals: dict[str, list[Any]]) -> dict[str, Any]:
        """Flux ControlNets' residuals for the double and the single blocks."""
        dtype = model.unet.dtype
        out: dict[str, Any] = {}
        if residuals.get("dit_blocks"):
            out["controlnet_block_samples"] = [r.to(dtype) for r in residuals["dit_blocks"]]
        if residuals.get("dit_single"):
            out["controlnet_single_block_samples"] = [r.to(dtype) for r in residuals["dit_single"]]
        return out

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        context, pooled = batched(entries, batch, int(model.unet.config.joint_attention_dim), device, dtype)
        kwargs = {"encoder_hidden_states": context, "pooled_projections": pooled,
                  "txt_ids": torch.zeros(context.shape[1], 3, device=device, dtype=dtype)}
        if model.unet.config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([float(extras.get("guidance", DEFAULT_GUIDANCE))
                                               for _, extras in entries for _ in range(batch)],
                                              device=device, dtype=torch.float32)
        rows = [extras for _, extras in entries for _ in range(batch)]
        extra = input_channels(model) - self.latent_format.channels
        if extra > 0 and any(e.get("concat_latent_image") is not None for e in rows):
            shape = (1, *latent_shape[1:])
            kwargs["flux_concat"] = [
                (concat_image(e["concat_latent_image"], shape, device) if e.get("concat_latent_image") is not None
                 else None,
                 concat_mask(e["concat_mask"], shape, device) if e.get("concat_mask") is not None and extra > 16
                 else None) for e in rows]
        if any(e.get("reference_latents") for e in rows):
            kwargs["flux_refs"] = [[self.latent_format.process_in(r.float()).to(device)[:1]
                                    for r in e.get("reference_latents") or []] for e in rows]
            kwargs["flux_ref_methods"] = [str(e.get("reference_latents_method") or "offset") for e in rows]
        if model.post_input_patches:  # USOStyleReference: each patch's tokens go before what is there so far
            width = int(model.unet.config.num_attention_heads) * int(model.unet.config.attention_head_dim)
            prefix = context.new_zeros((len(rows), 0, width))
            for patch in model.post_input_patches:
                tokens = patch.tokens
                if tokens.shape[-1] != width:
                    from tui_diffusion.pipeline.errors import NodeError

                    raise NodeError(f"{patch.source}: its tokens are {tokens.shape[-1]} wide but this Flux model's "
                                    f"are {width}: the projector goes with the model it was trained for")
                prefix = torch.cat([_to_batch(tokens.to(device, dtype), len(rows)), prefix], dim=1)
            kwargs["flux_txt_prefix"] = prefix
        if any(e.get("attention_mask") is not None for e in rows):  # StyleModelApply's attn_bias (Redux)
            from tui_diffusion.pipeline.clip_vision import dit_attention_mask

            grid = (-(-latent_shape[-2] // 2), -(-latent_shape[-1] // 2))
            size = context.shape[1] + grid[0] * grid[1]
            masks = [dit_attention_mask(e, context.shape[1], grid) for e in rows]
            kwargs["flux_attention_mask"] = torch.stack([m if m is not None else torch.zeros(size, size)
                                                         for m in masks]).to(device)
        return kwargs

    def extra_channels(self, model: Any, latent_in: Any, mask: Any) -> Any:
        """What Canny/Depth and Fill models read where no conditioning brings an image: the empty image's latent
        and (Fill) the noise mask, or an all-ones mask without one (ComfyUI's defaults)."""
        import torch

        extra = input_channels(model) - self.latent_format.channels
        if extra <= 0:
            return None
        shape = tuple(latent_in.shape)
        parts = [concat_image(torch.zeros(shape), shape, latent_in.device)]
        if extra > 16:
            parts.append(concat_mask(mask[:, :1] if mask is not None else torch.ones(shape[0], 1, *shape[-2:]),
                                     shape, latent_in.device))
        return torch.cat(parts, dim=1)

    def apply_model(self, model: Any, x: Any, timestep: Any, kwargs: dict[str, Any]) -> Any:
        import torch

        net = model.unet
        kwargs = dict(kwargs)
        overrides, refs = kwargs.pop("flux_concat", None), kwargs.pop("flux_refs", None)
        methods = kwargs.pop("flux_ref_methods", None) or ["offset"] * x.shape[0]
        prefix = kwargs.pop("flux_txt_prefix", None)
        if overrides is not None:  # the conditioning's own image (and mask) replace the defaults, row by row
            c = self.latent_format.channels
            x = x.clone()
            for i, (image, mask) in enumerate(overrides):
                if image is not None:
                    x[i, c:2 * c] = image[0].to(x.dtype)
                if mask is not None:
                    x[i, 2 * c:] = mask[0].to(x.dtype)
        want = input_channels(model)
        if x.shape[1] != want:
            from tui_diffusion.pipeline.errors import NodeError

            raise NodeError(f"this Flux model takes {want} input channels per latent cell, the sampler gave "
                            f"{x.shape[1]}")
        h, w = x.shape[-2:]
        x, kwargs = to_model_dtype(net, x, kwargs)
        t = timestep.reshape(-1).to(x.dtype)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        same_refs = refs is None or all([r.shape for r in row] == [r.shape for r in refs[0]] for row in refs)
        if same_refs and (refs is None or len(set(methods)) == 1):
            stacked = [torch.cat(rs) for rs in zip(*refs, strict=True)] if refs else None
            return self._call(net, x, t, kwargs, stacked, methods[0], prefix)[..., :h, :w]
        outs = []  # reference latents of different sizes or placements: one call per row
        for i in range(x.shape[0]):
            row = {k: (v[i:i + 1] if getattr(v, "ndim", 0) and k != "txt_ids" else v) for k, v in kwargs.items()}
            outs.append(self._call(net, x[i:i + 1], t[i:i + 1], row, refs[i], methods[i],
                                   prefix[i:i + 1] if prefix is not None else None))
        return torch.cat(outs)[..., :h, :w]

    @staticmethod
    def _call(net: Any, x: Any, t: Any, kwargs: dict[str, Any], refs: list[Any] | None, method: str = "offset",
              prefix: Any = None) -> Any:
        """One transformer call; reference latents join as extra image tokens and are cut from the output;
        ``prefix`` tokens (USO's) go before the embedded text tokens, at position 0."""
        import torch

        kwargs = dict(kwargs)
        mask = kwargs.pop("flux_attention_mask", None)
        x = pad_to_patch(x, 2)
        hp, wp = x.shape[-2:]
        tokens, ids = pack(x), image_ids(hp, wp, x.device, x.dtype)
        n = tokens.shape[1]
        for ref, (index, h_off, w_off) in zip(refs or [], reference_positions(refs or [], method, (hp // 2, wp // 2)),
                                              strict=True):
            ref = pad_to_patch(ref.to(x.device, x.dtype), 2)
            rh, rw = ref.shape[-2:]
            ref_ids = image_ids(rh, rw, x.device, x.dtype)
            ref_ids[:, 0] = index
            ref_ids[:, 1] += h_off
            ref_ids[:, 2] += w_off
            tokens = torch.cat([tokens, pack(_to_batch(ref, x.shape[0]))], dim=1)
            ids = torch.cat([ids, ref_ids])
        n_pre = 0 if prefix is None else int(prefix.shape[1])
        if mask is not None:  # an additive bias over [text, image, reference] tokens; references and USO's get none
            pad = tokens.shape[1] - n
            mask = torch.nn.functional.pad(mask, (n_pre, pad, n_pre, pad)) if pad or n_pre else mask
            kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None].to(tokens.device, tokens.dtype)}
        hook = None
        if n_pre:
            txt_ids = kwargs["txt_ids"]
            kwargs["txt_ids"] = torch.cat([txt_ids.new_zeros((n_pre, txt_ids.shape[-1])), txt_ids])
            prefix = _to_batch(prefix, x.shape[0])

            def put_before(module: Any, args: Any, out: Any) -> Any:
                return torch.cat([prefix.to(out.device, out.dtype), out], dim=1)

            hook = net.context_embedder.register_forward_hook(put_before)
        try:
            out = net(hidden_states=tokens, timestep=t, img_ids=ids, return_dict=False, **kwargs)[0]
        finally:
            if hook is not None:
                hook.remove()
        return unpack(out[:, :n], hp, wp)


FLUX = FluxFamily()

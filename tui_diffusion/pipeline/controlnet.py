"""ControlNets and T2I-Adapters: single files loaded offline, and the residuals they add to a UNet's call.

ComfyUI's model of control is kept: ``ControlNetLoader`` gives a loaded network (``ControlModel``); an apply
node puts a ``Control`` (the network, a hint image, a strength and a start/end window) under each conditioning
entry's ``"control"``, chained to the control that entry already had (``previous``). While sampling, the
denoiser asks ``control_inputs`` for the extra keyword arguments of each model call: every chain of the batch
is evaluated on the rows it conditions, each link only inside its window (in sigmas, as ComfyUI's
``percent_to_sigma`` maps it), its output multiplied by its strength and added to the links before it; the
family turns the sums into the network's arguments (``Family.control_kwargs``).

Files, in the layouts they are published in: ControlNets in the original layout (``control_model.*`` keys,
lllyasviel's and most SD1.x/SD2.x files, also without the prefix) and in diffusers' layout (many SDXL files),
ControlNets stored as a difference to their model (kohya's ``difference`` files, DiffControlNetLoader), and
T2I-Adapters in TencentARC's original layout or diffusers' (``adapter.*``). They are built as diffusers'
``ControlNetModel`` and ``T2IAdapter`` from configs read off the tensor shapes, on the meta device, the
weights assigned without a copy.

Transformer ControlNets, as ComfyUI's ``comfy/controlnet.py`` reads them: Stability's SD3.5 Large ControlNets
(blur, canny, depth: ``control_type``, self-attention blocks, the model's own patch embedding), SD3 ControlNets in
diffusers' layout (InstantX's), and Flux ControlNets in the InstantX/Shakker layout (union ones with a task token,
SetUnionControlNetType) and in XLabs' layout, built as diffusers' ``SD3ControlNetModel`` and
``FluxControlNetModel``. Their hint is a latent: the image resized to the latent's pixels, encoded by the apply
node's VAE and scaled into the ControlNet's space (SD3.5 canny/depth files first change the image as ComfyUI
does); their per-block residuals are repeated over the model's blocks as ComfyUI repeats them and added to the
image tokens (SD3's last block through a hook on ``norm_out``: diffusers' transformer leaves that block out,
ComfyUI does not). XLabs' Flux ControlNets take the image itself through their own convolutions (diffusers'
conditioning embedding) and their outputs cycle over the model's blocks. Recognised and refused with the reason:
Control-LoRA, UNet union ControlNets (ControlNet++), Flux ControlNets in MistoLine's layout, inpainting Flux
ControlNets, the 2B SD3.5 ControlNet variant.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import PICKLE_SUFFIXES
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.placement import in_use, place

log = logging.getLogger(__name__)

#: ComfyUI's union ControlNet types (SetUnionControlNetType), by the numbers the networks were trained with
UNION_TYPES: dict[str, int] = {
    "openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2, "canny/lineart/anime_lineart/mlsd": 3, "normal": 4,
    "segment": 5, "tile": 6, "repaint": 7,
}
#: ComfyUI resizes hints with nearest-exact after a centre crop to the latent's aspect
HINT_UPSCALE = "nearest-exact"


# -- the loaded network ---------------------------------------------------------------------------------------
#: a transformer ControlNet layout (``ControlModel.kind``) -> the family id it controls
_LAYOUT_FAMILY = {"sd3": "sd3", "sd35": "sd3", "flux": "flux"}


@dataclass(eq=False)
class ControlModel:
    """CONTROL_NET: a loaded ControlNet or T2I-Adapter, and the model family it was trained for."""

    #: "controlnet" or "t2i_adapter" (UNet families); "sd3" (diffusers' SD3 layout), "sd35" (Stability's SD3.5
    #: Large ControlNets) or "flux" (InstantX/Shakker layout) for the transformer families
    kind: str
    net: Any
    #: the family it fits, for messages ("SD1.x", "SD2.x", "SDXL", "SD3/SD3.5", "Flux.1")
    label: str
    source: str
    device: Device
    #: (scale, shift) of the hint's latent when the hint is the VAE's encoding of the image (SD3/Flux ones)
    latent_hint: tuple[float, float] | None = None
    #: how the hint image is changed before encoding ("canny", "depth" as ComfyUI does for the SD3.5 files)
    preprocess: str = ""
    #: SetUnionControlNetType's task number for a union ControlNet (None: "auto", no task token)
    union_type: int | None = None

    @property
    def needs_vae(self) -> bool:
        return self.latent_hint is not None

    @property
    def family_id(self) -> str | None:
        """The id of the family a transformer ControlNet's layout is made for (UNet ones are fitted by shape)."""
        return _LAYOUT_FAMILY.get(self.kind)

    @property
    def name(self) -> str:
        return Path(self.source).name


@dataclass(eq=False)
class Control:
    """One applied ControlNet of a chain: what an apply node puts under a conditioning's ``"control"``."""

    model: ControlModel
    #: the hint image [B, C, H, W] in 0..1
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    #: the control the conditioning had before this one was applied (its output is added to this one's)
    previous: Control | None = None
    #: the VAE that encodes the hint of a ControlNet taking a latent hint (``ControlModel.needs_vae``)
    vae: Any = None
    #: hints resized to a latent size, T2I-Adapter features (they do not depend on the step)
    _cache: dict = field(default_factory=dict, repr=False)

    def chain(self) -> list[Control]:
        """The controls of this chain, first applied first."""
        out: list[Control] = []
        c: Control | None = self
        while c is not None:
            out.append(c)
            c = c.previous
        return out[::-1]

    def active(self, model_sampling: Any, sigma: float) -> bool:
        """Whether the step at ``sigma`` lies within this control's start/end window (ComfyUI's test)."""
        high = model_sampling.percent_to_sigma(self.start_percent)
        low = model_sampling.percent_to_sigma(self.end_percent)
        return not (sigma > high or sigma < low)

    def residuals(self, model: Any, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any], sigma: float,
                  batch: int) -> dict[str, list[torch.Tensor]]:
        """The summed, strength-scaled outputs of the chain's active links for these rows of the batch."""
        total: dict[str, list[torch.Tensor]] = {}
        for c in self.chain():
            if not c.active(model.model_sampling, sigma):
                continue
            fits(c.model, model)
            if c.model.kind in DIT_KINDS:
                out = c._dit(model, x, timestep, kwargs, batch)
            elif c.model.kind == "controlnet":
                out = c._controlnet(model, x, timestep, kwargs, batch)
            else:
                out = c._adapter(model, x, batch)
            for key, values in out.items():
                have = total.setdefault(key, [])
                for i, v in enumerate(values):
                    if i >= len(have):
                        have.append(v)
                    else:
                        have[i] = have[i] + v
        return total

    def _hint(self, width: int, height: int) -> torch.Tensor:
        key = ("hint", width, height)
        if key not in self._cache:
            from tui_diffusion.pipeline.nodes_latent import common_upscale

            self._cache[key] = common_upscale(self.hint.float(), width, height, HINT_UPSCALE, "center")
        return self._cache[key]

    def _controlnet(self, model: Any, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any],
                    batch: int) -> dict[str, list[torch.Tensor]]:
        net = self.model.net
        dtype = net.dtype
        scale = model.family.latent_format.downscale
        hint = self._hint(x.shape[-1] * scale, x.shape[-2] * scale)
        hint = broadcast_rows(hint, x.shape[0], batch).to(x.device, dtype)
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        with in_use(net):
            down, mid = net(x.to(dtype), timestep, encoder_hidden_states=kwargs["encoder_hidden_states"].to(dtype),
                            controlnet_cond=hint, conditioning_scale=float(self.strength), added_cond_kwargs=added,
                            return_dict=False)
        out_dtype = x.dtype
        return {"down": [d.to(out_dtype) for d in down], "mid": [mid.to(out_dtype)]}

    def _latent_hint(self, width: int, height: int, channels: int) -> torch.Tensor:
        """The hint of a ControlNet that takes a latent, as ComfyUI makes it: the image resized to the latent's
        pixels (nearest-exact after a centre crop), preprocessed as the file's type asks, encoded by the VAE,
        scaled and shifted into the ControlNet's latent space, and given a mask channel of ones where the network
        takes one (inpainting ControlNets without a mask)."""
        key = ("latent", width, height)
        if key not in self._cache:
            if self.vae is None:
                raise NodeError(f"{self.model.name}: this ControlNet takes its hint as a latent and needs a VAE: "
                                "connect the model's VAE to the apply node's vae input (or use ControlNetApplySD3)")
            down = int(self.vae.downscale)
            hint = self._hint(width * down, height * down)[:, :3]
            if self.model.preprocess == "canny":  # ComfyUI's own scaling for Stability's canny ControlNet
                hint = hint * 255 * 0.5 + 0.5
            elif self.model.preprocess == "depth":
                hint = 1.0 - hint
            latent = self.vae.encode(hint.movedim(1, -1)).float()
            scale, shift = self.model.latent_hint or (1.0, 0.0)
            latent = (latent - shift) * scale
            if channels > latent.shape[1]:
                ones = torch.ones(latent.shape[0], channels - latent.shape[1], *latent.shape[2:])
                latent = torch.cat([latent, ones], dim=1)
            self._cache[key] = latent
        return self._cache[key]

    def _dit(self, model: Any, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any],
             batch: int) -> dict[str, list[torch.Tensor]]:
        """An SD3 or Flux ControlNet's residuals, one per block of the model (ComfyUI's repetition of the
        ControlNet's fewer blocks), under ``dit_blocks`` (SD3's joint blocks, Flux's double blocks) and
        ``dit_single`` (Flux's single blocks)."""
        net = self.model.net
        dtype = net.dtype
        if not self.model.needs_vae:  # XLabs: the image itself at 8x the latent, in -1..1
            scale = model.family.latent_format.downscale
            hint = self._hint(x.shape[-1] * scale, x.shape[-2] * scale)[:, :3] * 2.0 - 1.0
        elif self.model.kind == "flux":
            hint = self._latent_hint(x.shape[-1], x.shape[-2], int(net.config.in_channels) // 4)
        else:
            hint = self._latent_hint(x.shape[-1], x.shape[-2], int(net.pos_embed_input.proj.weight.shape[1]))
        hint = broadcast_rows(hint, x.shape[0], batch).to(x.device, dtype)
        with in_use(net):
            if self.model.kind == "flux":
                out = _flux_residuals(self, model, x, hint, timestep, kwargs)
            else:
                out = _sd3_residuals(self, model, x, hint, timestep, kwargs)
        return {k: [v.to(x.dtype) for v in vs] for k, vs in out.items()}

    def _adapter(self, model: Any, x: torch.Tensor, batch: int) -> dict[str, list[torch.Tensor]]:
        adapter = self.model.net
        scale = model.family.latent_format.downscale
        unshuffle = int(adapter.config.downscale_factor)
        width = math.ceil(x.shape[-1] * scale / unshuffle) * unshuffle
        height = math.ceil(x.shape[-2] * scale / unshuffle) * unshuffle
        key = ("features", width, height, str(x.device))
        if key not in self._cache:
            hint = self._hint(width, height)
            if adapter.config.in_channels == 1 and hint.shape[1] > 1:
                hint = hint.mean(1, keepdim=True)
            with in_use(adapter):
                self._cache[key] = [f for f in adapter(hint.to(x.device, adapter.dtype))]
        feats = [broadcast_rows(f, x.shape[0], batch).to(x.dtype) * float(self.strength) for f in self._cache[key]]
        return {"intra": feats}


def broadcast_rows(t: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
    """A hint (or its features) for ``rows`` rows made of conditionings of ``batch`` rows each, as ComfyUI's
    ``broadcast_image_to``: one image serves every row; several are cycled over each conditioning's rows."""
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    per = t[:batch]
    if per.shape[0] < batch:
        per = torch.cat([per] * (batch // per.shape[0]) + [per[: batch % per.shape[0]]])
    return per if per.shape[0] == rows else torch.cat([per] * (rows // batch))


def fits(control: ControlModel, model: Any) -> None:
    """A clear error when a ControlNet or T2I-Adapter was made for another model family than ``model``'s."""
    if control.kind in DIT_KINDS:
        _fits_dit(control, model)
        return
    unet_config = getattr(model.unet, "config", None)
    channels = getattr(unet_config, "block_out_channels", None)
    label = model.family.label
    what = "ControlNet" if control.kind == "controlnet" else "T2I-Adapter"
    refuse = NodeError(f"{control.name}: an {control.label} {what} cannot control a {label} model; use one made "
                       f"for {label}")
    if channels is None or not hasattr(unet_config, "cross_attention_dim"):  # not a UNet (SD3/Flux transformers)
        raise refuse
    xl = getattr(unet_config, "addition_embed_type", None) == "text_time"
    cfg = control.net.config
    if control.kind == "t2i_adapter":
        if (cfg.adapter_type == "full_adapter_xl") != xl:
            raise refuse
        widths = min(len(cfg.channels), len(channels))  # a light adapter has one width fewer than its levels
        if not xl and list(cfg.channels)[:widths] != list(channels)[:widths]:
            raise refuse
        return
    if (list(cfg.block_out_channels) != list(channels) or cfg.cross_attention_dim != unet_config.cross_attention_dim
            or (cfg.addition_embed_type == "text_time") != xl):
        raise refuse
    if xl and cfg.projection_class_embeddings_input_dim != unet_config.projection_class_embeddings_input_dim:
        raise refuse
    if xl and cfg.addition_time_embed_dim != unet_config.addition_time_embed_dim:
        # the size numbers are embedded as the model embeds them (the width is not in the file's shapes)
        from diffusers.models.embeddings import Timesteps

        proj = model.unet.add_time_proj
        control.net.add_time_proj = Timesteps(unet_config.addition_time_embed_dim, proj.flip_sin_to_cos,
                                              proj.downscale_freq_shift)
        control.net.register_to_config(addition_time_embed_dim=unet_config.addition_time_embed_dim)


def _fits_dit(control: ControlModel, model: Any) -> None:
    label = model.family.label
    refuse = f"{control.name}: an {control.label} ControlNet cannot control a {label} model; use one made for {label}"
    if model.family.id != control.family_id:
        raise NodeError(refuse)
    main, cfg = model.unet.config, control.net.config
    width = int(main.num_attention_heads) * int(main.attention_head_dim)
    own = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    if own != width:
        raise NodeError(f"{control.name}: this ControlNet is {own} wide, the model {width}: it was made for another "
                        f"size of {label} model")


# -- SD3 and Flux ControlNets during sampling -----------------------------------------------------------------
#: the ControlNet kinds that drive a transformer (their residuals are added to its blocks' image tokens)
DIT_KINDS = ("sd3", "sd35", "flux")
#: the residual for an SD3 model's last block, by id of that model's ``norm_out``: ComfyUI adds one there, while
#: diffusers' transformer leaves its last (context-pre-only) block out, so a pre-hook on ``norm_out`` adds it
_LAST_BLOCK: dict[int, torch.Tensor] = {}


def _repeat_each(outputs: list[torch.Tensor], times: int) -> list[torch.Tensor]:
    return [o for o in outputs for _ in range(times)]


def _to_blocks(outputs: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """One residual per block of the model: the first ``blocks`` of ``outputs``, zeros after them."""
    out = list(outputs[:blocks])
    return out + [torch.zeros_like(outputs[0])] * (blocks - len(out))


def sd35_position_embedding(width: int, h: int, w: int) -> torch.Tensor:
    """The sine/cosine positions Stability's SD3.5 ControlNets add to the image tokens ([h*w, width]): a grid
    spanning 0..15 along the shorter side (centre 7.5), the longer side in proportion; the first half of the
    channels encodes the column, the second the row (ComfyUI's ``get_2d_sincos_pos_embed_torch``)."""
    small = min(h, w)
    rows = torch.linspace(7.5 - 7.5 * h / small, 7.5 + 7.5 * h / small, h)
    cols = torch.linspace(7.5 - 7.5 * w / small, 7.5 + 7.5 * w / small, w)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def waves(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([waves(grid_c), waves(grid_r)], dim=1)


def _sd3_residuals(control: Control, model: Any, x: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor,
                   kwargs: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    from tui_diffusion.families.sd3 import pad_to_patch

    net, main = control.model.net, model.unet
    dtype = net.dtype
    patch = int(main.config.patch_size)
    t = timestep.reshape(-1).to(x.device, dtype)
    t = t.expand(x.shape[0]) if t.numel() == 1 else t
    xp = pad_to_patch(x, patch)
    hint = pad_to_patch(hint, patch)
    pooled = kwargs["pooled_projections"].to(dtype)
    depth = int(net.config.num_attention_heads) * int(net.config.attention_head_dim) // 64
    if control.model.kind == "sd35":
        # the image tokens through the model's own patch embedding, with the ControlNet's positions
        tokens = main.pos_embed.proj(xp.to(main.dtype)).flatten(2).transpose(1, 2).to(dtype)
        h, w = (x.shape[-2] + 1) // patch, (x.shape[-1] + 1) // patch
        tokens = tokens + sd35_position_embedding(tokens.shape[-1], h, w).to(tokens.device, dtype)
        outs = net(hidden_states=tokens, controlnet_cond=hint, conditioning_scale=float(control.strength),
                   pooled_projections=pooled, timestep=t, return_dict=False)[0]
        outs = _repeat_each(list(outs), math.ceil(depth / len(outs)))
    else:  # diffusers' layout: the pooled vector zeroed, as ComfyUI and diffusers both do for these
        context = kwargs["encoder_hidden_states"].to(dtype)
        outs = list(net(hidden_states=xp.to(dtype), controlnet_cond=hint, conditioning_scale=float(control.strength),
                        encoder_hidden_states=context, pooled_projections=torch.zeros_like(pooled), timestep=t,
                        return_dict=False)[0])
        count = depth // len(outs)
        outs = [o for i, o in enumerate(outs) for _ in range(count - (i == len(outs) - 1))]
    return {"dit_blocks": _to_blocks(outs, len(main.transformer_blocks))}


def _flux_residuals(control: Control, model: Any, x: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor,
                    kwargs: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    from tui_diffusion.families.flux import DEFAULT_GUIDANCE, image_ids, pack
    from tui_diffusion.families.sd3 import pad_to_patch

    if kwargs.get("flux_refs") is not None:
        raise NodeError(f"{control.model.name}: a Flux ControlNet cannot be combined with reference latents "
                        "(ReferenceLatent, Kontext) here")
    net, main = control.model.net, model.unet
    dtype = net.dtype
    pixels = net.input_hint_block is not None  # XLabs: the hint convolutions make the tokens
    xp = pad_to_patch(x, 2)
    h, w = xp.shape[-2:]
    hint = hint if pixels else pack(pad_to_patch(hint, 2))
    t = timestep.reshape(-1).to(x.device, dtype)
    t = t.expand(x.shape[0]) if t.numel() == 1 else t
    context = kwargs["encoder_hidden_states"].to(dtype)
    guidance = None
    if net.config.guidance_embeds:
        guidance = kwargs.get("guidance")
        if guidance is None:  # a dev-based ControlNet on schnell: the guidance dev embeds unless told
            guidance = torch.full((x.shape[0],), DEFAULT_GUIDANCE, device=x.device)
        guidance = guidance.to(x.device, torch.float32)
    mode = None
    union = bool(getattr(net, "union", False))
    if union and control.model.union_type is not None:
        mode = torch.full((x.shape[0], 1), control.model.union_type, dtype=torch.long, device=x.device)
    try:
        net.union = mode is not None  # "auto": ComfyUI adds no task token
        double, single = net(hidden_states=pack(xp.to(dtype)), controlnet_cond=hint, controlnet_mode=mode,
                             conditioning_scale=float(control.strength), encoder_hidden_states=context,
                             pooled_projections=kwargs["pooled_projections"].to(dtype), timestep=t,
                             img_ids=image_ids(h, w, x.device, dtype),
                             txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype),
                             guidance=guidance, return_dict=False)
    finally:
        net.union = union
    out: dict[str, list[torch.Tensor]] = {}
    n_double, n_single = len(main.transformer_blocks), len(main.single_transformer_blocks)
    for key, outputs, blocks in (("dit_blocks", double, n_double), ("dit_single", single, n_single)):
        if outputs and blocks:
            times = math.ceil(blocks / len(outputs))
            # ComfyUI: a latent-hint ControlNet's outputs each serve consecutive blocks; XLabs' cycle over them
            out[key] = _to_blocks(list(outputs) * times if pixels else _repeat_each(list(outputs), times), blocks)
    return out


def _add_last_block(module: Any, args: tuple) -> tuple | None:
    residual = _LAST_BLOCK.pop(id(module), None)
    if residual is None:
        return None
    return (args[0] + residual.to(args[0].dtype), *args[1:])


def sd3_block_kwargs(main: Any, blocks: list[torch.Tensor]) -> dict[str, Any]:
    """SD3's transformer arguments for ControlNet residuals (the SD3 family's ``control_kwargs``): diffusers'
    transformer skips the last block's residual, which ComfyUI adds, so a hook on ``norm_out`` adds it."""
    if not blocks:
        return {}
    norm_out = main.norm_out
    if not getattr(norm_out, "_tui_control_hook", False):
        norm_out.register_forward_pre_hook(_add_last_block)
        norm_out._tui_control_hook = True
    _LAST_BLOCK[id(norm_out)] = blocks[-1]
    return {"block_controlnet_hidden_states": blocks}


# -- the denoiser's hook --------------------------------------------------------------------------------------
def _rows(value: Any, rows: torch.Tensor, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim and value.shape[0] == total else value
    if isinstance(value, Mapping):
        return {k: _rows(v, rows, total) for k, v in value.items()}
    return value


def control_inputs(model: Any, entries: list[tuple[Any, dict]], x: torch.Tensor, timestep: torch.Tensor,
                   sigma: float, kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """The extra keyword arguments of one batched model call from the entries' controls (none: ``{}``).

    ``entries[i]`` conditions rows ``i*batch..(i+1)*batch`` of ``x`` (the model-space input, without an
    inpainting model's extra channels) and of the family's ``kwargs``. Entries sharing one control chain (an
    apply node's positive and negative) are evaluated in one call; rows without control get zeros.
    """
    norm_out = getattr(model.unet, "norm_out", None)
    if norm_out is not None:  # a last-block residual left by a failed call must not reach the next one
        _LAST_BLOCK.pop(id(norm_out), None)
    groups: dict[int, tuple[Control, list[int]]] = {}
    for i, (_, extras) in enumerate(entries):
        control = extras.get("control")
        if control is not None:
            groups.setdefault(id(control), (control, []))[1].append(i)
    if not groups:
        return {}
    total = x.shape[0]
    parts = []
    for control, indices in groups.values():
        rows = torch.cat([torch.arange(i * batch, (i + 1) * batch) for i in indices])
        out = control.residuals(model, x[rows.to(x.device)], timestep[rows.to(timestep.device)],
                                _rows(kwargs, rows, total), sigma, batch)
        if out:
            parts.append((rows, out))
    if not parts:
        return {}
    merged: dict[str, list[torch.Tensor]] = {}
    for key in {k for _, out in parts for k in out}:
        length = max(len(out.get(key, [])) for _, out in parts)
        slots = []
        for p in range(length):
            sample = next(out[key][p] for _, out in parts if len(out.get(key, [])) > p)
            full = sample.new_zeros((total, *sample.shape[1:]))
            for rows, out in parts:
                if len(out.get(key, [])) > p:
                    full[rows.to(full.device)] = out[key][p]
            slots.append(full)
        merged[key] = slots
    return model.family.control_kwargs(model, merged)


def with_uncond_controls(positive: list, negative: list | None) -> list | None:
    """The negative conditioning with the controls of positive entries applied by ControlNetApply (the old node,
    ``control_apply_to_uncond``), when the negative has none: ComfyUI gives them to the unconditional side too."""
    if negative is None:
        return None
    if any("area" not in extras and extras.get("control") is not None for _, extras in negative):
        return negative
    controls = [extras["control"] for _, extras in positive if extras.get("control_apply_to_uncond")
                and "area" not in extras and extras.get("control") is not None]
    others = [i for i, (_, extras) in enumerate(negative) if "area" not in extras]
    if not controls or not others:
        return negative
    out = list(negative)
    for n, control in enumerate(controls):
        i = others[n % len(others)]
        out[i] = [negative[i][0], {**negative[i][1], "control": control}]
    return out


# -- reading files --------------------------------------------------------------------------------------------
def read_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a ControlNet file; pickles only with ``allow_pickle`` (weights only)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle files ({suffix}) can run arbitrary code when loaded and are "
                                  "refused; use the .safetensors version, or allow them with --allow-pickle")
        from tui_diffusion.pipeline.models import read_pickle_checkpoint

        return read_pickle_checkpoint(path)
    if suffix not in (".safetensors", ".sft"):
        raise CheckpointError(f"{path}: not a .safetensors file")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot read this file: {exc}") from None


def _has(state: Mapping[str, Any], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in state)


def refusal(state: Mapping[str, Any]) -> str | None:
    """Why a recognised kind of control file cannot be loaded here, or None."""
    if "lora_controlnet" in state:
        return "a Control-LoRA (Stability's control-lora files) is not supported"
    if _has(state, "task_embedding", "control_add_embedding.", "control_model.task_embedding",
            "control_model.control_add_embedding.") or any("transformer_layes" in k for k in state):
        return ("a union ControlNet (ControlNet++ union/promax) is not supported: its task embedding needs "
                "diffusers' ControlNetUnionModel, which is not wired in yet")
    if "controlnet_blocks.0.linear.weight" in state:
        return "a Flux ControlNet in MistoLine's layout is not supported"
    if _has(state, "double_blocks.") and "controlnet_blocks.0.weight" not in state:
        return "a Flux ControlNet in an unknown layout (double blocks but no 'controlnet_blocks.*') is not supported"
    if _has(state, "after_proj_list."):
        return "a Hunyuan-DiT ControlNet is not supported"
    return None


def dit_kind(state: Mapping[str, Any]) -> str | None:
    """Which transformer ControlNet a file holds (``DIT_KINDS``), by ComfyUI's tests of its keys, or None."""
    if "controlnet_x_embedder.weight" in state:
        return "flux"
    if "controlnet_blocks.0.weight" in state and _has(state, "double_blocks."):
        return "xlabs"
    if "pos_embed_input.proj.weight" in state:
        return "sd35" if _has(state, "control_type") or any(
            k.startswith("transformer_blocks.") and k.endswith(".adaLN_modulation.1.bias") for k in state) else "sd3"
    if _has(state, "transformer_blocks.", "joint_blocks.", "controlnet_blocks.", "y_embedder.", "control_type"):
        return "sd3"  # something SD3-like but incomplete: the loader names what is missing
    return None


def load_control(path: Path, device: Device, allow_pickle: bool = False, model: Any = None) -> ControlModel:
    """A ControlNet or T2I-Adapter file as a ``ControlModel``; CheckpointError names the file and why not.

    ``model``: for a ControlNet stored as a difference to a model (DiffControlNetLoader), the MODEL whose
    weights are added to it.
    """
    from tui_diffusion.pipeline.models_dit import quiet_libraries

    quiet_libraries()
    state = read_state(path, allow_pickle)
    why = refusal(state)
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    kind = dit_kind(state)
    if kind is not None:
        if kind in ("sd3", "sd35") and "pos_embed_input.proj.weight" not in state:
            raise CheckpointError(f"{path}: an incomplete SD3/SD3.5 ControlNet: no 'pos_embed_input.proj.weight' "
                                  "(its hint embedding)")
        return _dit_model(kind, state, path, device)
    difference = "difference" in state
    if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers' layout
        state = {k: v for k, v in state.items() if k != "difference"}
    elif "control_model.zero_convs.0.0.weight" in state or "zero_convs.0.0.weight" in state:
        state = controlnet_from_original(state, str(path))
    elif _has(state, "adapter.", "conv_in.", "body.0."):
        return _adapter_model(adapter_from_original(state, str(path)), path, device)
    else:
        raise CheckpointError(f"{path}: neither a ControlNet nor a T2I-Adapter (no 'control_model.*', "
                              "'controlnet_*' or adapter tensors)")
    if difference:
        if model is None or not hasattr(model.unet, "state_dict"):
            log.warning("%s: a ControlNet stored as a difference loaded without a model (use DiffControlNetLoader);"
                        " it will very likely not work", path)
        else:
            base = model.unet.state_dict()
            state = {k: v + base[k].to(v.dtype).cpu() if k in base and base[k].shape == v.shape else v
                     for k, v in state.items()}
    config = controlnet_config(state, str(path))
    stem = path.stem
    config["global_pool_conditions"] = stem.endswith(("_shuffle", "_shuffle_fp16"))  # ComfyUI's rule
    from diffusers import ControlNetModel

    net = _build(ControlNetModel, config, state, "ControlNet", path)
    place(net, device, device.dtype)
    if config.get("addition_embed_type") == "text_time":
        label = "SDXL"
    else:
        label = "SD2.x" if config["cross_attention_dim"] == 1024 else "SD1.x"
    return ControlModel("controlnet", net, label, str(path), device)


def _adapter_model(state: dict[str, torch.Tensor], path: Path, device: Device) -> ControlModel:
    from diffusers import T2IAdapter

    config = adapter_config(state, str(path))
    net = _build(T2IAdapter, config, state, "T2I-Adapter", path)
    place(net, device, device.dtype)
    label = "SDXL" if config["adapter_type"] == "full_adapter_xl" else "SD1.x"
    return ControlModel("t2i_adapter", net, label, str(path), device)


def _dit_model(kind: str, state: dict[str, torch.Tensor], path: Path, device: Device) -> ControlModel:
    """An SD3 or Flux ControlNet as diffusers' ``SD3ControlNetModel``/``FluxControlNetModel``, with what ComfyUI
    does with its hint (``ControlModel.latent_hint``, ``preprocess``)."""
    from tui_diffusion.families.flux import FLUX_LATENT
    from tui_diffusion.families.sd3 import SD3_LATENT

    file = str(path)
    preprocess = ""
    hint: tuple[float, float] | None
    if kind == "xlabs":  # XLabs' layout: a pixel hint through its own convolutions; diffusers' model has them
        from diffusers import FluxControlNetModel as cls

        state, config = xlabs_to_diffusers(state, file)
        kind, label, hint = "flux", "Flux.1", None
    elif kind == "flux":
        from diffusers import FluxControlNetModel as cls

        config = flux_controlnet_config(state, file)
        label, hint = "Flux.1", (FLUX_LATENT.scale_factor, FLUX_LATENT.shift_factor)
    else:
        from diffusers import SD3ControlNetModel as cls

        label = "SD3/SD3.5"
        if kind == "sd35":
            control_type = state.get("control_type")
            number = round(float(control_type.float().reshape(-1)[0])) if control_type is not None else -1
            preprocess = {1: "canny", 2: "depth"}.get(number, "")
            state = sd35_controlnet_to_diffusers(state, file)
            config = sd35_controlnet_config(state, file)
            hint = (SD3_LATENT.scale_factor, SD3_LATENT.shift_factor)
        else:
            config = sd3_controlnet_config(state, file)
            hint = (SD3_LATENT.scale_factor, 0.0)  # ComfyUI: no shift for these ("SD3 controlnet weirdness")
    from tui_diffusion.pipeline.models_dit import compute_dtype

    net = _build(cls, config, state, f"{label} ControlNet", path)
    place(net, device, compute_dtype(device))  # bf16 where the device's fp16 would overflow, as the model runs
    return ControlModel(kind, net, label, file, device, latent_hint=hint, preprocess=preprocess)


def _width(state: Mapping[str, torch.Tensor], key: str, file: str, axis: int = 0) -> int:
    return _dim(state, key, file, axis)


def sd3_controlnet_config(state: Mapping[str, torch.Tensor], file: str) -> dict[str, Any]:
    """``SD3ControlNetModel``'s config for a ControlNet in diffusers' layout (InstantX's SD3 ones), from shapes;
    64 channels per head, as every MMDiT has."""
    inner = _width(state, "pos_embed.proj.weight", file)
    latent = _width(state, "pos_embed.proj.weight", file, 1)
    positions = _width(state, "pos_embed.pos_embed", file, 1)
    dual = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", k))})
    return {
        "sample_size": 128, "patch_size": _width(state, "pos_embed.proj.weight", file, 2), "in_channels": latent,
        "num_layers": _count(state, r"transformer_blocks\.(\d+)\."), "attention_head_dim": 64,
        "num_attention_heads": inner // 64, "joint_attention_dim": _width(state, "context_embedder.weight", file, 1),
        "caption_projection_dim": _width(state, "context_embedder.weight", file),
        "pooled_projection_dim": _width(state, "time_text_embed.text_embedder.linear_1.weight", file, 1),
        "out_channels": latent, "pos_embed_max_size": math.isqrt(positions),
        "extra_conditioning_channels": _width(state, "pos_embed_input.proj.weight", file, 1) - latent,
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state else None,
    }


#: Stability's SD3.5 ControlNet blocks (ComfyUI's DismantledBlock) -> diffusers' SD3SingleTransformerBlock
_SD35_BLOCK = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
               "adaLN_modulation.1": "norm1.linear"}
_SD35_EMBEDDERS = {"t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
                   "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                   "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
                   "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2"}


def sd35_controlnet_to_diffusers(state: Mapping[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """Stability's SD3.5 Large ControlNet keys (blocks with fused qkv; embedders named as diffusers names them,
    or as the MMDiT does) -> ``SD3ControlNetModel``'s, the mapping of diffusers' conversion script."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "control_type":
            continue
        if m := re.match(r"(transformer_blocks\.\d+\.)attn\.qkv\.(weight|bias)$", key):
            for name, piece in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{m.group(1)}attn.{name}.{m.group(2)}"] = piece
            continue
        if m := re.match(r"(transformer_blocks\.\d+\.)(.+)\.(weight|bias)$", key):
            if m.group(2) in _SD35_BLOCK:
                out[f"{m.group(1)}{_SD35_BLOCK[m.group(2)]}.{m.group(3)}"] = value
                continue
        if m := re.match(r"(.+)\.(weight|bias)$", key):
            if m.group(1) in _SD35_EMBEDDERS:
                out[f"{_SD35_EMBEDDERS[m.group(1)]}.{m.group(2)}"] = value
                continue
        out[key] = value
    if "time_text_embed.text_embedder.linear_1.weight" in out:
        shape = out["time_text_embed.text_embedder.linear_1.weight"].shape
        if shape[0] == shape[1]:
            raise CheckpointError(f"{file}: an SD3.5 ControlNet with a second pooled-vector embedding (the 2B "
                                  "variant) is not supported; the SD3.5 Large ones are")
    return out


def sd35_controlnet_config(state: Mapping[str, torch.Tensor], file: str) -> dict[str, Any]:
    """``SD3ControlNetModel``'s config for Stability's SD3.5 Large ControlNets: self-attention blocks only, no
    context, no patch embedding of its own (the model's is used), 64 channels per head."""
    inner = _width(state, "time_text_embed.text_embedder.linear_1.weight", file)
    hint = _width(state, "pos_embed_input.proj.weight", file, 1)
    return {
        "sample_size": 128, "patch_size": _width(state, "pos_embed_input.proj.weight", file, 2), "in_channels": 16,
        "num_layers": _count(state, r"transformer_blocks\.(\d+)\."), "attention_head_dim": 64,
        "num_attention_heads": inner // 64, "joint_attention_dim": None, "caption_projection_dim": inner,
        "pooled_projection_dim": _width(state, "time_text_embed.text_embedder.linear_1.weight", file, 1),
        "out_channels": 16, "pos_embed_max_size": None, "extra_conditioning_channels": hint - 16,
        "pos_embed_type": None, "use_pos_embed": False, "force_zeros_for_pooled_projection": False,
    }


def flux_controlnet_config(state: Mapping[str, torch.Tensor], file: str) -> dict[str, Any]:
    """``FluxControlNetModel``'s config for InstantX/Shakker Flux ControlNets (diffusers' layout), from shapes;
    128 channels per head and Flux's rotary axes, as every Flux transformer has."""
    from tui_diffusion.modelfiles.convert_dit import FLUX_HEAD_DIM, FLUX_ROPE_AXES

    inner = _width(state, "x_embedder.weight", file)
    latent = _width(state, "x_embedder.weight", file, 1)
    hint = _width(state, "controlnet_x_embedder.weight", file, 1)
    if hint != latent:
        raise CheckpointError(f"{file}: a Flux ControlNet whose hint has {hint // 4} channels per latent cell "
                              f"(an inpainting ControlNet) is not supported; those with {latent // 4} are")
    cfg: dict[str, Any] = {
        "patch_size": 1, "in_channels": latent, "num_layers": _count(state, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(state, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": FLUX_HEAD_DIM, "num_attention_heads": inner // FLUX_HEAD_DIM,
        "joint_attention_dim": _width(state, "context_embedder.weight", file, 1),
        "pooled_projection_dim": _width(state, "time_text_embed.text_embedder.linear_1.weight", file, 1),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state,
        "axes_dims_rope": list(FLUX_ROPE_AXES),
    }
    if "controlnet_mode_embedder.weight" in state:
        cfg["num_mode"] = _width(state, "controlnet_mode_embedder.weight", file)
    return cfg


#: XLabs' hint convolutions (a Sequential with SiLUs between) -> diffusers' ControlNetConditioningEmbedding
_XLABS_HINT = {0: "conv_in", 2: "blocks.0", 4: "blocks.1", 6: "blocks.2", 8: "blocks.3", 10: "blocks.4",
               12: "blocks.5", 14: "conv_out"}


def xlabs_to_diffusers(state: Mapping[str, torch.Tensor], file: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An XLabs Flux ControlNet (Black Forest Labs' keys for its double blocks and embedders, ``controlnet_blocks``,
    ``pos_embed_input``, ``input_hint_block``) in ``FluxControlNetModel``'s keys, and its config from shapes: the
    hint convolutions as diffusers' conditioning embedding, whose output is cut into 2x2 patches (patch size 2)."""
    from tui_diffusion.modelfiles.convert_dit import FLUX_HEAD_DIM, FLUX_ROPE_AXES, flux_to_diffusers

    hidden = _width(state, "img_in.weight", file)
    config: dict[str, Any] = {
        "patch_size": 2, "in_channels": _width(state, "img_in.weight", file, 1),
        "num_layers": _count(state, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(state, r"single_blocks\.(\d+)\."),
        "attention_head_dim": FLUX_HEAD_DIM, "num_attention_heads": hidden // FLUX_HEAD_DIM,
        "joint_attention_dim": _width(state, "txt_in.weight", file, 1),
        "pooled_projection_dim": _width(state, "vector_in.in_layer.weight", file, 1),
        "guidance_embeds": "guidance_in.in_layer.weight" in state, "axes_dims_rope": list(FLUX_ROPE_AXES),
        "conditioning_embedding_channels": _width(state, "input_hint_block.14.weight", file),
    }

    def get(key: str) -> torch.Tensor:
        if key.startswith("final_layer."):  # a ControlNet has no final layer: placeholders, dropped below
            return torch.zeros(2 * hidden)
        if key not in state:
            raise CheckpointError(f"{file}: an incomplete Flux ControlNet: tensor {key!r} is missing")
        return state[key]

    out = {k: v for k, v in flux_to_diffusers(state, config, get=get).items()
           if not k.startswith(("proj_out.", "norm_out."))}
    for key, value in state.items():
        if key.startswith("controlnet_blocks."):
            out[key] = value
        elif key.startswith("pos_embed_input."):
            out["controlnet_x_embedder." + key[len("pos_embed_input."):]] = value
        elif m := re.match(r"input_hint_block\.(\d+)\.(weight|bias)$", key):
            if int(m.group(1)) not in _XLABS_HINT:
                raise CheckpointError(f"{file}: an XLabs ControlNet with unexpected hint layers ({key!r})")
            out[f"input_hint_block.{_XLABS_HINT[int(m.group(1))]}.{m.group(2)}"] = value
    return out, config


def _build(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], what: str, path: Path) -> Any:
    """The model built on the meta device with ``state`` assigned as its weights (every weight must be there)."""
    try:
        with torch.device("meta"):
            net = cls.from_config(config)
    except Exception as exc:  # diffusers validates configs with assorted exception types
        raise CheckpointError(f"{path}: an unsupported {what} layout ({exc})") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: not a complete {what}: {len(missing)} tensors missing (e.g. {missing[0]!r})")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: an unsupported {what} layout: {wrong[0]!r} is {tuple(state[wrong[0]].shape)}, "
                              f"expected {tuple(expected[wrong[0]].shape)}")
    unused = sorted(set(state) - set(expected))
    if unused:
        log.debug("%s: %d tensors not used (e.g. %s)", path, len(unused), unused[0])
    net.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    for name, buf in net.named_buffers():
        if buf.device.type == "meta":
            raise CheckpointError(f"{path}: {what} buffer {name!r} was not in the file")
    return net.eval()


# -- ControlNet layouts ---------------------------------------------------------------------------------------
_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
                 "emb_layers.1": "time_emb_proj"}


def _resnet_key(rest: str) -> str:
    if rest.startswith("skip_connection."):
        return "conv_shortcut." + rest[len("skip_connection."):]
    head, _, tail = rest.partition(".")
    mid, _, tail = tail.partition(".")
    return f"{_RESNET_PARTS[head + '.' + mid]}.{tail}"


def controlnet_from_original(state: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """A ControlNet in the original layout (``control_model.*``, or without the prefix) in diffusers' keys."""
    prefix = "control_model." if "control_model.zero_convs.0.0.weight" in state else ""
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != "difference"}
    ops = sorted(int(m.group(1)) for k in src if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    n_inputs = len({m.group(1) for k in src if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    layers = ops[0] - 1 if ops else n_inputs - 1
    hints = sorted({int(m.group(1)) for k in src if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
    if not hints or layers < 1:
        raise CheckpointError(f"{file}: an incomplete ControlNet (no hint block or input blocks)")
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        new = _controlnet_key(key, layers, hints[-1])
        if new is None:
            log.debug("%s: tensor %s not used", file, key)
            continue
        out[new] = value
    return out


def _controlnet_key(key: str, layers: int, last_hint: int) -> str | None:
    simple = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "middle_block_out.0.": "controlnet_mid_block.",
              "middle_block.1.": "mid_block.attentions.0."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"middle_block\.([02])\.(.+)$", key):
        return f"mid_block.resnets.{int(m.group(1)) // 2}.{_resnet_key(m.group(2))}"
    if m := re.match(r"zero_convs\.(\d+)\.0\.(.+)$", key):
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if m := re.match(r"input_hint_block\.(\d+)\.(.+)$", key):
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            return "controlnet_cond_embedding.conv_in." + rest
        if i == last_hint:
            return "controlnet_cond_embedding.conv_out." + rest
        return f"controlnet_cond_embedding.blocks.{i // 2 - 1}.{rest}"
    if m := re.match(r"input_blocks\.(\d+)\.([01])\.(.+)$", key):
        n, part, rest = int(m.group(1)), m.group(2), m.group(3)
        if part == "0" and rest.startswith("op."):
            return f"down_blocks.{n // (layers + 1) - 1}.downsamplers.0.conv.{rest[3:]}"
        b, j = (n - 1) // (layers + 1), (n - 1) % (layers + 1)
        if part == "0":
            return f"down_blocks.{b}.resnets.{j}.{_resnet_key(rest)}"
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    return None


def _count(state: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _dim(state: Mapping[str, torch.Tensor], key: str, file: str, axis: int = 0) -> int:
    try:
        return int(state[key].shape[axis])
    except KeyError:
        raise CheckpointError(f"{file}: an incomplete ControlNet: tensor {key!r} is missing") from None


def controlnet_config(state: Mapping[str, torch.Tensor], file: str) -> dict[str, Any]:
    """A ``ControlNetModel`` config from the shapes of a ControlNet in diffusers' keys.

    What shapes cannot tell follows the families' conventions: SD1.x's 8 attention heads per level; 64 channels
    per head for SD2.x (1024-wide context) and SDXL; SDXL's size numbers embedded 256 wide (matched to the
    model's own width when the ControlNet is applied).
    """
    n_levels = _count(state, r"down_blocks\.(\d+)\.")
    if n_levels == 0:
        raise CheckpointError(f"{file}: an incomplete ControlNet: no down blocks")
    channels = [_dim(state, f"down_blocks.{i}.resnets.0.conv1.weight", file) for i in range(n_levels)]
    has_attn = [_has(state, f"down_blocks.{i}.attentions.") for i in range(n_levels)]
    depth = [_count(state, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(n_levels)]
    mid_depth = _count(state, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    depth = [d or mid_depth or 1 for d in depth]
    to_k = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in state if k.endswith(".proj_in.weight")), None)
    n_hint = _count(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    hint_channels = [_dim(state, "controlnet_cond_embedding.conv_in.weight", file)]
    hint_channels += [_dim(state, f"controlnet_cond_embedding.blocks.{i}.weight", file) for i in range(1, n_hint, 2)]
    cross = int(state[to_k].shape[1]) if to_k else 768
    xl = "add_embedding.linear_1.weight" in state
    cfg: dict[str, Any] = {
        "in_channels": _dim(state, "conv_in.weight", file, 1),
        "conditioning_channels": _dim(state, "controlnet_cond_embedding.conv_in.weight", file, 1),
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "layers_per_block": _count(state, r"down_blocks\.0\.resnets\.(\d+)\."),
        "cross_attention_dim": cross,
        "transformer_layers_per_block": depth,
        "use_linear_projection": bool(proj_in and state[proj_in].ndim == 2),
        "conditioning_embedding_out_channels": hint_channels,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if _has(state, "mid_block.attentions.") else "UNetMidBlock2D",
        "norm_num_groups": 32,
        "attention_head_dim": [max(1, c // 64) for c in channels] if xl or cross == 1024 else 8,
    }
    if xl:
        width = _dim(state, "add_embedding.linear_1.weight", file, 1)
        # SDXL's 256 where the width holds it; otherwise a placeholder the model's own width replaces (``fits``)
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=width,
                   addition_time_embed_dim=256 if width > 6 * 256 else 8)
    return cfg


# -- T2I-Adapter layouts --------------------------------------------------------------------------------------
def adapter_from_original(state: dict[str, torch.Tensor], file: str) -> dict[str, torch.Tensor]:
    """A T2I-Adapter in diffusers' keys (``adapter.*``) from TencentARC's original layout (or as it is)."""
    if _has(state, "adapter."):
        return state
    if any(".skep." in k or ".down_opt.op." in k for k in state):
        raise CheckpointError(f"{file}: a T2I-Adapter variant with skip or strided-conv blocks, which diffusers' "
                              "T2IAdapter does not have")
    out: dict[str, torch.Tensor] = {}
    light = "body.0.in_conv.weight" in state and "conv_in.weight" not in state
    for key, value in state.items():
        if key.startswith("conv_in."):
            out["adapter." + key] = value
        elif light and (m := re.match(r"body\.(\d+)\.body\.(\d+)\.(.+)$", key)):
            out[f"adapter.body.{m.group(1)}.resnets.{m.group(2)}.{m.group(3)}"] = value
        elif light and (m := re.match(r"body\.(\d+)\.((?:in|out)_conv\..+)$", key)):
            out[f"adapter.body.{m.group(1)}.{m.group(2)}"] = value
        elif m := re.match(r"body\.(\d+)\.in_conv\.(.+)$", key):
            out[f"adapter.body.{int(m.group(1)) // 2}.in_conv.{m.group(2)}"] = value
        elif m := re.match(r"body\.(\d+)\.(block[12]\..+)$", key):
            k = int(m.group(1))
            out[f"adapter.body.{k // 2}.resnets.{k % 2}.{m.group(2)}"] = value
        else:
            log.debug("%s: tensor %s not used", file, key)
    return out


def adapter_config(state: Mapping[str, torch.Tensor], file: str) -> dict[str, Any]:
    """A ``T2IAdapter`` config from the shapes (ComfyUI's rule: 256 or 768 input channels is an SDXL adapter)."""
    n_blocks = _count(state, r"adapter\.body\.(\d+)\.")
    res_blocks = _count(state, r"adapter\.body\.0\.resnets\.(\d+)\.")
    if "adapter.conv_in.weight" in state:
        cin = _dim(state, "adapter.conv_in.weight", file, 1)
        xl = cin in (256, 768)
        factor = 16 if xl else 8
        kernel = state["adapter.body.0.resnets.0.block2.weight"].shape[-1] if n_blocks else 1
        if kernel != 1:
            raise CheckpointError(f"{file}: a T2I-Adapter with {kernel}x{kernel} second convolutions, which "
                                  "diffusers' T2IAdapter does not have")
        channels = [_dim(state, f"adapter.body.{i}.resnets.0.block1.weight", file) for i in range(n_blocks)]
        return {"in_channels": cin // factor**2, "channels": channels, "num_res_blocks": res_blocks,
                "downscale_factor": factor, "adapter_type": "full_adapter_xl" if xl else "full_adapter"}
    if "adapter.body.0.in_conv.weight" not in state:
        raise CheckpointError(f"{file}: an incomplete T2I-Adapter (no conv_in or body.0.in_conv)")
    cin = _dim(state, "adapter.body.0.in_conv.weight", file, 1)
    channels = [_dim(state, f"adapter.body.{i}.out_conv.weight", file) for i in range(n_blocks - 1)]
    return {"in_channels": cin // 64, "channels": channels, "num_res_blocks": res_blocks, "downscale_factor": 8,
            "adapter_type": "light_adapter"}

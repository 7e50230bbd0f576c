"""GLIGEN text boxes: ComfyUI's single files loaded into diffusers' GLIGEN parts, attached to a UNet while it samples.

ComfyUI's model of GLIGEN is kept: ``GLIGENLoader`` gives a loaded model (``GligenModel``: one gated self-attention
"fuser" per transformer block of the UNet and the position net that turns boxed phrases into grounding tokens);
``GLIGENTextBoxApply`` puts ``GligenBoxes`` under each conditioning entry's ``"gligen"``, the phrase's pooled text
and the box in latent cells (pixels // 8, as ComfyUI stores them). While sampling, rows of an entry with boxes run
the fusers after each block's self-attention (ComfyUI's ``middle_patch``); rows without boxes (the negative, as in
ComfyUI) run the plain model.

The files hold ComfyUI's layout: ``{input_blocks.N|middle_block|output_blocks.N}.1.transformer_blocks.K.fuser.*``
and ``position_net.*`` (also under ``model.diffusion_model.``). The parts are diffusers' own
(``GatedSelfAttentionDense``, ``GLIGENTextBoundingboxProjection``): their parameter names are ComfyUI's, so the
weights load unrenamed; each fuser is keyed to its transformer block by the block's original name. Attaching is
reversible: ``attached`` sets the fusers and the position net on the UNet for one sampling and removes them after,
so the cached UNet stays as it was loaded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import PICKLE_SUFFIXES
from tui_diffusion.pipeline.errors import NodeError

#: ComfyUI's Gligen.max_objs: the grounding tokens are padded to this many boxes
MAX_OBJECTS = 30
#: the latent cell size ComfyUI divides pixel boxes by (GLIGEN exists for SD1.x)
CELL = 8

_FUSER = re.compile(r"^(?:model\.diffusion_model\.)?((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)"
                    r"\.transformer_blocks\.(\d+)\.fuser\.(.+)$")
_POSITION = re.compile(r"^(?:model\.diffusion_model\.)?position_net\.(.+)$")


@dataclass(eq=False)
class GligenModel:
    """GLIGEN: a loaded GLIGEN text-box model."""

    source: str
    #: diffusers' ``GLIGENTextBoundingboxProjection``: (boxes, masks, phrase embeddings) -> grounding tokens
    position_net: Any
    #: diffusers' ``GatedSelfAttentionDense`` by its transformer block's original name
    #: (``input_blocks.1.1.transformer_blocks.0``)
    fusers: dict[str, Any]
    #: the width of the phrases' pooled text embeddings (768 for SD1.x's CLIP-L)
    text_width: int

    @property
    def name(self) -> str:
        return Path(self.source).name


@dataclass(frozen=True, eq=False)
class GligenBoxes:
    """What GLIGENTextBoxApply puts under a conditioning entry's ``"gligen"`` (ComfyUI's ``("position", model,
    params)``): each box as (pooled phrase [1, width], height, width, y, x), sizes in latent cells."""

    model: GligenModel
    boxes: tuple[tuple[torch.Tensor, int, int, int, int], ...]


# -- loading --------------------------------------------------------------------------------------------------
def _read(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle files ({path.suffix}) can run arbitrary code when loaded and are "
                                  "refused; use the .safetensors version of the model, or allow them with "
                                  "--allow-pickle (loaded with torch.load(weights_only=True))")
        from tui_diffusion.pipeline.models import read_pickle_checkpoint

        return read_pickle_checkpoint(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tui_diffusion.modelfiles.header import read_header

    read_header(path)  # refuse a lying or truncated file before reading tensors
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read it as safetensors: {exc}") from None


def load_gligen(path: Path, allow_pickle: bool = False) -> GligenModel:
    """A GLIGEN file in ComfyUI's layout; CheckpointError names the file and says what is wrong."""
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    state = _read(path, allow_pickle)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    position: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _FUSER.match(key)
        if m:
            groups.setdefault(f"{m.group(1)}.transformer_blocks.{m.group(2)}", {})[m.group(3)] = tensor.float()
        elif (p := _POSITION.match(key)) is not None:
            position[p.group(1)] = tensor.float()
    if not groups or "null_positive_feature" not in position:
        raise CheckpointError(f"{path}: not a GLIGEN text-box model (expected '...transformer_blocks.N.fuser.*' and "
                              "'position_net.*' tensors)")
    try:
        text_width = position["null_positive_feature"].shape[0]
        out_dim = position["linears.4.weight"].shape[0]
        net = GLIGENTextBoundingboxProjection(positive_len=text_width, out_dim=out_dim, feature_type="text-only")
        net.load_state_dict(position)
        fusers = {}
        for name, sub in groups.items():
            query_dim, key_dim = sub["linear.weight"].shape
            inner = sub["attn.to_q.weight"].shape[0]
            # heads are set when attached: its block's (ComfyUI's rule, 8 for SD1.x's 768-wide tokens, is the same
            # on every published model, and diffusers' gated UNet does so)
            fuser = GatedSelfAttentionDense(query_dim, key_dim, 1, inner)
            fuser.load_state_dict(sub)
            fusers[name] = fuser.eval().requires_grad_(False)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: a GLIGEN file whose tensors do not fit together ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return GligenModel(str(path), net.eval().requires_grad_(False), fusers, int(text_width))


# -- the boxes ----------------------------------------------------------------------------------------------------
def box_tensors(boxes: GligenBoxes, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ComfyUI's ``Gligen.set_position``: the boxes as (x1, y1, x2, y2) fractions of the latent (cells divided by
    the latent's size, unclamped), a mask of the used slots, and the phrases' embeddings, padded to 30."""
    h, w = latent_hw
    width = boxes.model.text_width
    xyxy = torch.zeros(MAX_OBJECTS, 4)
    masks = torch.zeros(MAX_OBJECTS)
    phrases = torch.zeros(MAX_OBJECTS, width)
    for i, (pooled, bh, bw, y, x) in enumerate(boxes.boxes):
        xyxy[i] = torch.tensor((x / w, y / h, (x + bw) / w, (y + bh) / h))
        masks[i] = 1.0
        phrases[i] = pooled.reshape(-1).float()
    return xyxy, masks, phrases


def with_gligen(kwargs: dict[str, Any], entries: list, latent_hw: tuple[int, int], batch: int, device: Any,
                dtype: Any) -> None:
    """Add the grounding inputs of one batched UNet call to ``kwargs`` (nothing when no entry has boxes).

    ``entries[i]`` conditions rows ``i*batch..(i+1)*batch``; rows of entries without boxes are marked inactive
    and pass the fusers unchanged, as ComfyUI runs them without the patch."""
    found = [extras.get("gligen") for _, extras in entries]
    if not any(g is not None for g in found):
        return
    rows = []
    for g in found:
        if g is None:
            empty = (torch.zeros(MAX_OBJECTS, 4), torch.zeros(MAX_OBJECTS), None, False)
            rows.append(empty)
        else:
            rows.append((*box_tensors(g, latent_hw), True))
    width = next(g.model.text_width for g in found if g is not None)
    boxes = torch.stack([r[0] for r in rows for _ in range(batch)])
    masks = torch.stack([r[1] for r in rows for _ in range(batch)])
    phrases = torch.stack([r[2] if r[2] is not None else torch.zeros(MAX_OBJECTS, width)
                           for r in rows for _ in range(batch)])
    active = torch.tensor([r[3] for r in rows for _ in range(batch)])
    grounding = {"boxes": boxes.to(device, dtype), "masks": masks.to(device, dtype),
                 "positive_embeddings": phrases.to(device, dtype), "active": active.to(device)}
    kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), "gligen": grounding}


# -- attaching to a UNet ----------------------------------------------------------------------------------------
class _Position(torch.nn.Module):
    """The UNet's ``position_net`` while attached: grounding tokens, and which rows use them."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, positive_embeddings: torch.Tensor,
                active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(boxes, masks, positive_embeddings), active


class _Fuser(torch.nn.Module):
    """A block's ``fuser`` while attached: the gated self-attention on the rows with boxes, identity elsewhere."""

    def __init__(self, fuser: torch.nn.Module | None) -> None:
        super().__init__()
        self.fuser = fuser

    def forward(self, x: torch.Tensor, grounding: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        objs, active = grounding
        if self.fuser is None or not bool(active.any()):
            return x
        out = self.fuser(x, objs)
        return out if bool(active.all()) else torch.where(active.reshape(-1, 1, 1), out, x)


def transformer_blocks(unet: Any) -> dict[str, Any]:
    """A UNet's transformer blocks by their original-layout names (``input_blocks.1.1.transformer_blocks.0``)."""
    from diffusers.models.attention import BasicTransformerBlock

    from tui_diffusion.pipeline.checkpoint_writer import unet_original_key

    layers = getattr(getattr(unet, "config", None), "layers_per_block", None)
    if not isinstance(layers, int):
        return {}
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            try:
                out[unet_original_key(name + ".norm1.weight", layers).removesuffix(".norm1.weight")] = module
            except (KeyError, ValueError, IndexError):
                continue
    return out


@contextlib.contextmanager
def eager(unet: Any) -> Iterator[None]:
    """Run a compiled UNet uncompiled meanwhile: its graph knows neither added layers nor hooks."""
    compiled = getattr(unet, "_compiled_call_impl", None)
    if compiled is not None:
        unet._compiled_call_impl = None
    try:
        yield
    finally:
        if compiled is not None:
            unet._compiled_call_impl = compiled


def models_in(conds: list) -> list[GligenModel]:
    """The GLIGEN models the entries' boxes use, each once."""
    seen: dict[int, GligenModel] = {}
    for _, extras in conds:
        g = extras.get("gligen")
        if g is not None:
            seen.setdefault(id(g.model), g.model)
    return list(seen.values())


@contextlib.contextmanager
def attached(model: Any, conds: list) -> Iterator[None]:
    """The GLIGEN model of ``conds``' boxes attached to ``model``'s UNet for one sampling (nothing without boxes);
    the UNet is as it was afterwards."""
    models = models_in(conds)
    if not models:
        yield
        return
    if len(models) > 1:
        raise NodeError(f"the conditionings of this sampler use {len(models)} GLIGEN models "
                        f"({', '.join(g.name for g in models)}); use one GLIGENLoader for all boxes")
    gligen = models[0]
    unet = model.unet
    blocks = transformer_blocks(unet)
    for name, fuser in gligen.fusers.items():
        block = blocks.get(name)
        if block is None or block.attn1.query_dim != fuser.linear.out_features or \
                fuser.attn.inner_dim % block.attn1.heads:
            raise NodeError(f"{gligen.name}: does not fit this {model.family.label} model (no transformer block "
                            f"{name} of width {fuser.linear.out_features}); GLIGEN text-box models are for SD1.x")
    device, dtype = model.device.torch_device, model.device.dtype
    gligen.position_net.to(device, dtype)
    saved = []
    try:
        for name, block in blocks.items():
            fuser = gligen.fusers.get(name)
            if fuser is not None:
                fuser.to(device, dtype)
                fuser.attn.heads = block.attn1.heads
                fuser.attn.scale = (fuser.attn.inner_dim // block.attn1.heads) ** -0.5
            saved.append((block, block._modules.get("fuser")))
            block.fuser = _Fuser(fuser)
        saved.append((unet, unet._modules.get("position_net")))
        unet.position_net = _Position(gligen.position_net)
        with eager(unet):
            yield
    finally:
        for owner, previous in saved:
            attr = "position_net" if owner is unet else "fuser"
            if previous is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, previous)
        if model.device.offload != "none":  # the memory policy keeps models on the CPU between uses
            gligen.position_net.to("cpu")
            for fuser in gligen.fusers.values():
                fuser.to("cpu")

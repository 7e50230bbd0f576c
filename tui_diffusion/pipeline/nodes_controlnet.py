"""ControlNet nodes (ComfyUI's names, inputs and semantics; specs in ``graph/specs.py``).

The loaders give a CONTROL_NET (``controlnet.ControlModel``); the apply nodes put a ``controlnet.Control``
under each conditioning entry's ``"control"``, chained to the one it had, and the sampler evaluates the chains
(``controlnet.control_inputs``). As in ComfyUI, ControlNetApplyAdvanced gives the positive and the negative
one shared control per previous chain (they run as one batch), and strength 0 returns the conditioning as it is.
SD3 and Flux ControlNets take the hint as a latent: the apply node's VAE encodes it when sampling reaches them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.controlnet import UNION_TYPES, Control, ControlModel, load_control
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.registry import NodeResult, node


def _load(ctx: NodeContext, name: str, model: ModelHandle | None = None) -> ControlModel:
    eng = ctx.engine
    path, key = ctx.model_file("controlnet", name)

    def load() -> ControlModel:
        try:
            return load_control(path, eng.device, eng.allow_pickle, model=model)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    if model is not None:  # a difference file becomes a ControlNet for this model's weights
        key += repr(("diff", id(model.unet)))
    return eng.models.get(key, load)


def _check(control_net: Any) -> ControlModel:
    if not isinstance(control_net, ControlModel):
        raise NodeError("control_net: not a ControlNet (connect a ControlNetLoader)")
    return control_net


def _hint(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> the hint [B,C,H,W]."""
    return image.movedim(-1, 1)


@node("ControlNetLoader")
def controlnet_loader(ctx: NodeContext, control_net_name: str) -> NodeResult:
    return NodeResult((_load(ctx, control_net_name),))


@node("DiffControlNetLoader")
def diff_controlnet_loader(ctx: NodeContext, model: ModelHandle, control_net_name: str) -> NodeResult:
    return NodeResult((_load(ctx, control_net_name, model),))


@node("ControlNetApply")
def controlnet_apply(ctx: NodeContext, conditioning: list, control_net: Any, image: torch.Tensor,
                     strength: float = 1.0) -> NodeResult:
    """The old node: one conditioning, the whole schedule; the negative side gets the control as well."""
    control_net = _check(control_net)
    if control_net.needs_vae:
        raise NodeError(f"control_net: {control_net.name} is an {control_net.label} ControlNet, which takes its hint "
                        "through a VAE: use Apply ControlNet (ControlNetApplyAdvanced) with the vae input connected")
    if strength == 0:
        return NodeResult((conditioning,))
    hint = _hint(image)
    out = []
    for emb, extras in conditioning:
        control = Control(control_net, hint, strength, 0.0, 1.0, previous=extras.get("control"))
        out.append([emb, {**extras, "control": control, "control_apply_to_uncond": True}])
    return NodeResult((out,))


def apply_advanced(positive: list, negative: list, control_net: Any, image: torch.Tensor, strength: float,
                   start_percent: float, end_percent: float, vae: Any = None) -> tuple[list, list]:
    """ControlNetApplyAdvanced's semantics: one new control per previous chain, shared by both sides. ``vae``
    encodes the hint of the ControlNets that take a latent (SD3/Flux ones); the others ignore it."""
    control_net = _check(control_net)
    if control_net.needs_vae and vae is None:
        raise NodeError(f"vae: {control_net.name} is an {control_net.label} ControlNet, which takes its hint as a "
                        "latent: connect the model's VAE to the vae input")
    if vae is not None and control_net.needs_vae and getattr(vae, "latent_channels", 16) != 16:
        raise NodeError(f"vae: {control_net.name} takes a 16-channel latent hint, this VAE makes "
                        f"{vae.latent_channels} channels: connect the SD3/Flux VAE")
    if strength == 0:
        return positive, negative
    hint = _hint(image)
    made: dict[int, Control] = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for emb, extras in conditioning:
            previous = extras.get("control")
            control = made.get(id(previous))
            if control is None:
                control = Control(control_net, hint, strength, start_percent, end_percent, previous=previous,
                                  vae=vae if control_net.needs_vae else None)
                made[id(previous)] = control
            entries.append([emb, {**extras, "control": control, "control_apply_to_uncond": False}])
        out.append(entries)
    return out[0], out[1]


@node("ControlNetApplyAdvanced")
def controlnet_apply_advanced(ctx: NodeContext, positive: list, negative: list, control_net: Any, image: torch.Tensor,
                              strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0,
                              vae: Any = None) -> NodeResult:
    return NodeResult(apply_advanced(positive, negative, control_net, image, strength, start_percent, end_percent,
                                     vae))


@node("ControlNetApplySD3")
def controlnet_apply_sd3(ctx: NodeContext, positive: list, negative: list, control_net: Any, vae: Any,
                         image: torch.Tensor, strength: float = 1.0, start_percent: float = 0.0,
                         end_percent: float = 1.0) -> NodeResult:
    return NodeResult(apply_advanced(positive, negative, control_net, image, strength, start_percent, end_percent,
                                     vae))


@node("SetUnionControlNetType")
def set_union_controlnet_type(ctx: NodeContext, control_net: Any, type: str = "auto") -> NodeResult:
    control_net = _check(control_net)
    modes = getattr(control_net.net.config, "num_mode", None) if control_net.kind == "flux" else None
    if type != "auto" and type not in UNION_TYPES:
        raise NodeError(f"unknown union ControlNet type {type!r}")
    if modes:  # a Flux union ControlNet (InstantX/Shakker): the task token it is given, none for "auto"
        number = None if type == "auto" else UNION_TYPES[type]
        if number is not None and number >= modes:
            raise NodeError(f"type: {control_net.name} knows {modes} tasks, {type!r} is number {number}")
        return NodeResult((replace(control_net, union_type=number),))
    if type == "auto":
        return NodeResult((control_net,))
    raise NodeError(f"SetUnionControlNetType: type {type!r} selects a task of a union ControlNet (ControlNet++ "
                    f"union/promax), which this program cannot load yet ({control_net.name} is a plain "
                    f"{control_net.label} ControlNet); set the type to 'auto' or remove the node")

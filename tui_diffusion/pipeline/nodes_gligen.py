"""GLIGEN and hypernetwork nodes (ComfyUI's names, inputs and semantics; specs in ``graph/specs_gligen.py``).

GLIGENLoader gives a ``gligen.GligenModel``; GLIGENTextBoxApply adds a boxed phrase under each conditioning entry's
``"gligen"`` (the sampler attaches the model while it runs, ``gligen.attached``). HypernetworkLoader adds a
``hypernetwork.HypernetworkPatch`` to the MODEL's ``attention_patches`` (hooks added only while sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.gligen import CELL, MAX_OBJECTS, GligenBoxes, GligenModel, load_gligen
from tui_diffusion.pipeline.hypernetwork import HypernetworkPatch, fitting_widths, load_hypernetwork
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle
from tui_diffusion.pipeline.registry import NodeResult, node


@node("GLIGENLoader")
def gligen_loader(ctx: NodeContext, gligen_name: str) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("gligen", gligen_name)

    def load() -> GligenModel:
        try:
            return load_gligen(path, eng.allow_pickle)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    return NodeResult((eng.models.get(key, load),))


@node("GLIGENTextBoxApply")
def gligen_textbox_apply(ctx: NodeContext, conditioning_to: list, clip: ClipHandle, gligen_textbox_model: Any,
                         text: str, width: int = 64, height: int = 64, x: int = 0, y: int = 0) -> NodeResult:
    """ComfyUI's box: the phrase's pooled (unprojected) text and the box in latent cells, appended to the boxes the
    entry has (the latest GLIGEN model is the one used)."""
    from tui_diffusion.pipeline.nodes import encode_text

    if not isinstance(gligen_textbox_model, GligenModel):
        raise NodeError("gligen_textbox_model: not a GLIGEN model (connect a GLIGENLoader)")
    _, pooled = encode_text(clip, text)
    if pooled.shape[-1] != gligen_textbox_model.text_width:
        raise NodeError(f"clip: its pooled text is {pooled.shape[-1]} wide but {gligen_textbox_model.name} takes "
                        f"{gligen_textbox_model.text_width} (GLIGEN text-box models are for SD1.x: use the SD1.x "
                        "checkpoint's CLIP)")
    box = (pooled, height // CELL, width // CELL, y // CELL, x // CELL)
    out = []
    for emb, extras in conditioning_to:
        previous = extras.get("gligen")
        boxes = (previous.boxes if isinstance(previous, GligenBoxes) else ()) + (box,)
        if len(boxes) > MAX_OBJECTS:
            raise NodeError(f"conditioning_to: already holds {len(boxes) - 1} GLIGEN boxes; at most {MAX_OBJECTS} "
                            "fit one conditioning")
        out.append([emb, {**extras, "gligen": GligenBoxes(gligen_textbox_model, boxes)}])
    return NodeResult((out,))


@node("HypernetworkLoader")
def hypernetwork_loader(ctx: NodeContext, model: ModelHandle, hypernetwork_name: str,
                        strength: float = 1.0) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("hypernetworks", hypernetwork_name)
    hypernetwork = eng.loras.get("hypernetwork" + key, lambda: load_hypernetwork(path, eng.allow_pickle))
    if not fitting_widths(model.unet, hypernetwork):
        widths = ", ".join(str(w) for w in sorted(hypernetwork.layers))
        raise NodeError(f"{hypernetwork.name}: none of its widths ({widths}) is an attention width of this "
                        f"{model.family.label} model (a hypernetwork for another model family?)")
    if strength == 0.0:
        return NodeResult((model,))
    patch = HypernetworkPatch(hypernetwork, strength)
    return NodeResult((dataclasses.replace(model, attention_patches=(*model.attention_patches, patch)),))

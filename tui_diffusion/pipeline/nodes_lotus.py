"""Lotus nodes (ComfyUI's semantics; specs in ``graph/specs_lotus.py``): LotusConditioning and SetFirstSigma.

A Lotus UNet itself loads through UNETLoader (``nodes_dit.py`` asks the file's family, ``families/lotus.py``).
"""

from __future__ import annotations

import torch

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lotus import null_prompt
from tui_diffusion.pipeline.registry import NodeResult, node


@node("LotusConditioning")
def lotus_conditioning(ctx: NodeContext) -> NodeResult:
    """One entry, the null prompt, with nothing else (no pooled output): what ComfyUI's node returns."""
    return NodeResult(([[null_prompt(), {}]],))


@node("SetFirstSigma")
def set_first_sigma(ctx: NodeContext, sigmas: torch.Tensor, sigma: float = 136.0) -> NodeResult:
    """A copy of the sigmas whose first value is ``sigma`` (the input is left as it is)."""
    if sigmas.ndim != 1 or len(sigmas) == 0:
        raise NodeError(f"SetFirstSigma: sigmas: expected a non-empty 1-D sequence, got shape {tuple(sigmas.shape)}")
    out = sigmas.clone()
    out[0] = sigma
    return NodeResult((out,))

"""Step caching as a node (spec in graph/specs_cache.py): the MODEL comes out with a ``StepCache`` that the
sampler attaches while it runs (``pipeline/step_cache.py``); the cached network is never changed."""

from __future__ import annotations

import dataclasses

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.registry import NodeResult, node
from tui_diffusion.pipeline.step_cache import StepCache, applicable


@node("ApplyStepCache")
def apply_step_cache(ctx: NodeContext, model: ModelHandle, method: str = "first_block_cache",
                     threshold: float = 0.1, interval: int = 3, warmup: int = 2) -> NodeResult:
    """Checked here, so a method the model cannot take fails at this node, not inside the sampler."""
    cache = StepCache(method, float(threshold), int(interval), int(warmup))
    why = applicable(model.unet, method)
    if why is not None:
        raise NodeError(f"{model.family.label} model: {why}")
    # "none" is kept too: it turns the step_cache setting off for this model
    return NodeResult((dataclasses.replace(model, step_cache=cache),))

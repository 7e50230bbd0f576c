"""Node specs of step caching (implementations in pipeline/nodes_cache.py; the hooks in pipeline/step_cache.py).

``ApplyStepCache`` is this program's own node (ComfyUI's core has no step cache; its closest relatives are custom
nodes such as TeaCache and WaveSpeed's First Block Cache). Torch-free.
"""

from __future__ import annotations

from tui_diffusion.graph.specs import COMBO, FLOAT, INT, MODEL, InputSpec, NodeSpec, OutputSpec
from tui_diffusion.settings import STEP_CACHE_METHODS

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "ApplyStepCache", "Apply Step Cache", "advanced/model",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("method", COMBO, default="first_block_cache", choices=STEP_CACHE_METHODS,
                      tooltip="first_block_cache: SD3.x/Flux.1 transformers; taylorseer: any model; none: no "
                              "caching"),
            InputSpec("threshold", FLOAT, default=0.1, min=0.0, max=1.0, step=0.01,
                      tooltip="first_block_cache: how much the first block's output may change (relative) before "
                              "the other blocks run again; higher skips more and changes the image more"),
            InputSpec("interval", INT, default=3, min=1, max=100, step=1,
                      tooltip="taylorseer: one full step in this many (after the warmup)"),
            InputSpec("warmup", INT, default=2, min=0, max=1000, step=1,
                      tooltip="taylorseer: full steps before any is skipped"),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Skips work between similar sampling steps with diffusers' cache hooks: faster, and the "
                    "image changes a little. Opt-in; the loaded model itself is not changed.",
        extension=True,
    ),
)

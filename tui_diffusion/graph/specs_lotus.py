"""Node specs of Lotus depth/normal estimation and the sigma node its templates use (ComfyUI's ``nodes_lotus`` and
``nodes_custom_sampler``: names, inputs, defaults and ranges). Implementations in ``pipeline/nodes_lotus.py``; the
model family in ``families/lotus.py``. Torch-free.
"""

from __future__ import annotations

from tui_diffusion.graph.specs import CONDITIONING, FLOAT, SIGMAS, InputSpec, NodeSpec, OutputSpec

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "LotusConditioning", "LotusConditioning", "conditioning/lotus",
        inputs=(),
        outputs=(OutputSpec(CONDITIONING, "conditioning"),),
        description="Lotus's fixed prompt: its frozen text encoder's output for the empty prompt (2 x 1024), for "
                    "a Lotus model loaded with UNETLoader.",
    ),
    NodeSpec(
        "SetFirstSigma", "SetFirstSigma", "sampling/custom_sampling/sigmas",
        inputs=(
            InputSpec("sigmas", SIGMAS),
            InputSpec("sigma", FLOAT, default=136.0, min=0.0, max=20000.0, step=0.001),
        ),
        outputs=(OutputSpec(SIGMAS, "SIGMAS"),),
        description="The same sigmas with the first one replaced (Lotus starts from sigma 10000: timestep 999).",
    ),
)

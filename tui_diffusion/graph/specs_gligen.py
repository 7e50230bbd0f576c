"""Node specs of GLIGEN (boxed phrases) and hypernetworks, as ComfyUI declares them (see graph/specs.py for the
core set and the types)."""

from __future__ import annotations

from tui_diffusion.graph.specs import (
    CLIP,
    COMBO,
    CONDITIONING,
    FLOAT,
    INT,
    MAX_RESOLUTION,
    MODEL,
    STRING,
    InputSpec,
    NodeSpec,
    OutputSpec,
)

#: a loaded GLIGEN text-box model (its gated self-attention layers and position net)
GLIGEN = "GLIGEN"

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "GLIGENLoader", "GLIGENLoader", "loaders",
        inputs=(InputSpec("gligen_name", COMBO, choices_from="gligen",
                          tooltip="The GLIGEN model (models/gligen), e.g. gligen_sd14_textbox_pruned."),),
        outputs=(OutputSpec(GLIGEN, "GLIGEN"),),
        description="Loads a GLIGEN text-box model: it places phrases in boxes of the image (SD1.x).",
    ),
    NodeSpec(
        "GLIGENTextBoxApply", "GLIGENTextBoxApply", "conditioning/gligen",
        inputs=(
            InputSpec("conditioning_to", CONDITIONING),
            InputSpec("clip", CLIP),
            InputSpec("gligen_textbox_model", GLIGEN),
            InputSpec("text", STRING, default="", multiline=True,
                      tooltip="The phrase to place in the box (best a thing the prompt names)."),
            InputSpec("width", INT, default=64, min=8, max=MAX_RESOLUTION, step=8,
                      tooltip="The box's width in pixels."),
            InputSpec("height", INT, default=64, min=8, max=MAX_RESOLUTION, step=8,
                      tooltip="The box's height in pixels."),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8,
                      tooltip="The box's left edge in pixels."),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8,
                      tooltip="The box's top edge in pixels."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Adds a boxed phrase to the conditioning: while sampling, GLIGEN's gated self-attention "
                    "guides the phrase into the box (up to 30 boxes per conditioning).",
    ),
    NodeSpec(
        "HypernetworkLoader", "HypernetworkLoader", "loaders",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("hypernetwork_name", COMBO, choices_from="hypernetworks",
                      tooltip="The hypernetwork (models/hypernetworks): an A1111 .pt or a .safetensors file."),
            InputSpec("strength", FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Applies a hypernetwork: small networks that change the key and value inputs of the model's "
                    "attention layers, scaled by strength.",
    ),
)

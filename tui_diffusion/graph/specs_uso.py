"""Node specs of USO and the nodes its template uses (ComfyUI's names, inputs and defaults: ``nodes_model_patch``,
``nodes_flux``, ``nodes_images``). Implementations in ``pipeline/nodes_uso.py``."""

from __future__ import annotations

from tui_diffusion.graph.specs import (
    COMBO,
    CONDITIONING,
    IMAGE,
    INT,
    MAX_RESOLUTION,
    MODEL,
    InputSpec,
    NodeSpec,
    OutputSpec,
)
from tui_diffusion.graph.specs_vision import CLIP_VISION_OUTPUT

# Socket type of this area.
MODEL_PATCH = "MODEL_PATCH"

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "ModelPatchLoader", "ModelPatchLoader", "advanced/loaders",
        inputs=(InputSpec("name", COMBO, choices_from="model_patches",
                          tooltip="A model patch from model_patches/ (USO's style projector)."),),
        outputs=(OutputSpec(MODEL_PATCH, "MODEL_PATCH"),),
        description="Loads a model patch: USO's projector from SigLIP image features to Flux tokens.",
    ),
    NodeSpec(
        "USOStyleReference", "USOStyleReference", "advanced/model_patches/flux",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("model_patch", MODEL_PATCH),
            InputSpec("clip_vision_output", CLIP_VISION_OUTPUT),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="USO: a style image's SigLIP features, projected, go before the prompt's tokens of a Flux "
                    "model (with USO's DiT LoRA). Chain for several style images.",
    ),
    NodeSpec(
        "FluxKontextMultiReferenceLatentMethod", "Edit Model Reference Method", "advanced/conditioning/flux",
        inputs=(
            InputSpec("conditioning", CONDITIONING),
            InputSpec("reference_latents_method", COMBO, default="offset",
                      choices=("offset", "index", "uxo/uno", "index_timestep_zero"),
                      tooltip="Where reference latents sit: offset: beside each other; index: one position "
                              "index each; uxo/uno: diagonally past the image (USO, UNO)."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Sets how an edit model places the conditioning's reference latents.",
    ),
    NodeSpec(
        "ImageScaleToMaxDimension", "Scale Image to Max Dimension", "image/upscaling",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("upscale_method", COMBO, default="area",
                      choices=("area", "lanczos", "bilinear", "nearest-exact", "bicubic")),
            InputSpec("largest_size", INT, default=512, min=0, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Resizes images so the longer side is largest_size, keeping the aspect ratio.",
    ),
)

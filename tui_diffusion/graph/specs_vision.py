"""Node specs of CLIP vision, style models and unCLIP (issue 16 item 5; ComfyUI's nodes.py names and defaults).

Implementations in ``pipeline/nodes_vision.py``; the image encoders and style models in ``pipeline/clip_vision.py``.
"""

from __future__ import annotations

from tui_diffusion.graph.specs import (
    CLIP,
    COMBO,
    CONDITIONING,
    FLOAT,
    IMAGE,
    MODEL,
    VAE,
    InputSpec,
    NodeSpec,
    OutputSpec,
)

# Socket types of this area.
CLIP_VISION = "CLIP_VISION"
CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
STYLE_MODEL = "STYLE_MODEL"

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "CLIPVisionLoader", "Load CLIP Vision", "loaders",
        inputs=(InputSpec("clip_name", COMBO, choices_from="clip_vision",
                          tooltip="An image encoder from clip_vision/ (CLIP ViT-L/H/bigG, SigLIP)."),),
        outputs=(OutputSpec(CLIP_VISION, "CLIP_VISION"),),
        description="Loads an image encoder: CLIP vision (unCLIP, revision, IP-Adapter) or SigLIP (Flux Redux).",
    ),
    NodeSpec(
        "CLIPVisionEncode", "CLIP Vision Encode", "conditioning",
        inputs=(
            InputSpec("clip_vision", CLIP_VISION),
            InputSpec("image", IMAGE),
            InputSpec("crop", COMBO, default="center", choices=("center", "none"),
                      tooltip="center: scale the short side to the encoder's size and cut the middle; "
                              "none: squash the whole image to a square."),
        ),
        outputs=(OutputSpec(CLIP_VISION_OUTPUT, "CLIP_VISION_OUTPUT"),),
        description="Encodes an image with a CLIP vision model: its embedding and hidden states.",
    ),
    NodeSpec(
        "StyleModelLoader", "Load Style Model", "loaders",
        inputs=(InputSpec("style_model_name", COMBO, choices_from="style_models",
                          tooltip="A style model from style_models/ (Flux Redux, SD1.x T2I style adapter)."),),
        outputs=(OutputSpec(STYLE_MODEL, "STYLE_MODEL"),),
        description="Loads a style model: Flux Redux's image-to-token projector or SD1.x's T2I style adapter.",
    ),
    NodeSpec(
        "StyleModelApply", "Apply Style Model", "conditioning/style_model",
        inputs=(
            InputSpec("conditioning", CONDITIONING),
            InputSpec("style_model", STYLE_MODEL),
            InputSpec("clip_vision_output", CLIP_VISION_OUTPUT),
            InputSpec("strength", FLOAT, default=1.0, min=0.0, max=1000.0, step=0.001),
            InputSpec("strength_type", COMBO, default="multiply", choices=("multiply", "attn_bias"),
                      tooltip="multiply: scale the image tokens; attn_bias: bias the attention to them by "
                              "log(strength)."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Appends the image's tokens from a style model to each prompt (Flux Redux: prompt with an "
                    "image). Chain several to mix images.",
    ),
    NodeSpec(
        "unCLIPCheckpointLoader", "unCLIPCheckpointLoader", "loaders",
        inputs=(InputSpec("ckpt_name", COMBO, choices_from="checkpoints",
                          tooltip="An unCLIP checkpoint (SD2.1 unCLIP) with its image encoder inside."),),
        outputs=(OutputSpec(MODEL, "MODEL"), OutputSpec(CLIP, "CLIP"), OutputSpec(VAE, "VAE"),
                 OutputSpec(CLIP_VISION, "CLIP_VISION")),
        description="Loads an unCLIP checkpoint: the model, text encoder and VAE, and the image encoder it holds.",
    ),
    NodeSpec(
        "unCLIPConditioning", "unCLIPConditioning", "conditioning",
        inputs=(
            InputSpec("conditioning", CONDITIONING),
            InputSpec("clip_vision_output", CLIP_VISION_OUTPUT),
            InputSpec("strength", FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01),
            InputSpec("noise_augmentation", FLOAT, default=0.0, min=0.0, max=1.0, step=0.01,
                      tooltip="How much noise is added to the image embedding (more: further from the image)."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Guides an unCLIP model (SD2.1 unCLIP) or SDXL (revision) with an image's CLIP embedding.",
    ),
)


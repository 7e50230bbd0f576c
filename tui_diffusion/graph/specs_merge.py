"""Model merging and CheckpointSave (ComfyUI's comfy_extras/nodes_model_merging*.py): inputs, defaults, ranges.

The per-block nodes' input names are prefixes of the UNet's original (LDM) parameter names, as in ComfyUI
(``input_blocks.4`` for SDXL, ``input_blocks.4.`` for SD1/SD2); the first input's ratio applies to parameters
no input names.
"""

from __future__ import annotations

from tui_diffusion.graph.specs import CLIP, FLOAT, MODEL, STRING, VAE, InputSpec, NodeSpec, OutputSpec

CATEGORY = "advanced/model_merging"

#: ModelMergeSDXL's block inputs, in ComfyUI's order (no trailing dot after the block numbers)
SDXL_BLOCKS: tuple[str, ...] = ("time_embed.", "label_emb.", *(f"input_blocks.{i}" for i in range(9)),
                                *(f"middle_block.{i}" for i in range(3)), *(f"output_blocks.{i}" for i in range(9)),
                                "out.")
#: ModelMergeSD1's and ModelMergeSD2's (with trailing dots: SD1/SD2 have twelve input and output blocks)
SD1_BLOCKS: tuple[str, ...] = ("time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(12)),
                               *(f"middle_block.{i}." for i in range(3)),
                               *(f"output_blocks.{i}." for i in range(12)), "out.")
#: ModelMergeBlocks' inputs
BASIC_BLOCKS: tuple[str, ...] = ("input", "middle", "out")


def _ratio(name: str, tooltip: str = "") -> InputSpec:
    return InputSpec(name, FLOAT, default=1.0, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def _multiplier() -> InputSpec:
    return InputSpec("multiplier", FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01)


_MODELS = (InputSpec("model1", MODEL), InputSpec("model2", MODEL))
_CLIPS = (InputSpec("clip1", CLIP), InputSpec("clip2", CLIP))
_RATIO_TIP = "1.0: all model1, 0.0: all model2."


def _blocks(class_type: str, names: tuple[str, ...], description: str) -> NodeSpec:
    return NodeSpec(class_type, class_type, CATEGORY + "/model_specific",
                    inputs=(*_MODELS, *(_ratio(n) for n in names)), outputs=(OutputSpec(MODEL, "MODEL"),),
                    description=description)


SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "ModelMergeSimple", "ModelMergeSimple", CATEGORY,
        inputs=(*_MODELS, _ratio("ratio", _RATIO_TIP)),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Blends two models of the same architecture: model1 * ratio + model2 * (1 - ratio).",
    ),
    NodeSpec(
        "ModelMergeBlocks", "ModelMergeBlocks", CATEGORY,
        inputs=(*_MODELS, *(_ratio(n, _RATIO_TIP) for n in BASIC_BLOCKS)),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Blends two UNets with one ratio for the input blocks, the middle block and the output "
                    "blocks (model1's share).",
    ),
    NodeSpec(
        "ModelMergeSubtract", "ModelMergeSubtract", CATEGORY,
        inputs=(*_MODELS, _multiplier()),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="(model1 - model2) * multiplier: the difference, e.g. what a fine-tune added.",
    ),
    NodeSpec(
        "ModelMergeAdd", "ModelMergeAdd", CATEGORY,
        inputs=_MODELS,
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="model1 + model2 (adds a difference made by ModelMergeSubtract).",
    ),
    _blocks("ModelMergeSD1", SD1_BLOCKS, "Blends two SD1.x UNets with a ratio per block (model1's share)."),
    _blocks("ModelMergeSD2", SD1_BLOCKS, "Blends two SD2.x UNets with a ratio per block (model1's share)."),
    _blocks("ModelMergeSDXL", SDXL_BLOCKS, "Blends two SDXL UNets with a ratio per block (model1's share)."),
    NodeSpec(
        "CLIPMergeSimple", "CLIPMergeSimple", CATEGORY,
        inputs=(*_CLIPS, _ratio("ratio", "1.0: all clip1, 0.0: all clip2.")),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="Blends two text encoders: clip1 * ratio + clip2 * (1 - ratio).",
    ),
    NodeSpec(
        "CLIPMergeSubtract", "CLIPMergeSubtract", CATEGORY,
        inputs=(*_CLIPS, _multiplier()),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="(clip1 - clip2) * multiplier.",
    ),
    NodeSpec(
        "CLIPMergeAdd", "CLIPMergeAdd", CATEGORY,
        inputs=_CLIPS,
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="clip1 + clip2.",
    ),
    NodeSpec(
        "CheckpointSave", "Save Checkpoint", CATEGORY,
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("clip", CLIP),
            InputSpec("vae", VAE),
            InputSpec("filename_prefix", STRING, default="checkpoints/ComfyUI",
                      tooltip="Prefix of the file name, under the output folder (a sub-folder may be named)."),
        ),
        output_node=True,
        description="Writes the model, CLIP and VAE, merges and LoRAs applied, as one .safetensors checkpoint "
                    "in the original single-file layout, into the output folder.",
    ),
)

"""SD2.x: OpenCLIP ViT-H text (its penultimate layer, through the final norm), eps or v-prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tui_diffusion.families.sd1 import UNET, UNetFamily
from tui_diffusion.modelfiles.header import TensorInfo

SD2_TEXT = "cond_stage_model.model."
#: a norm bias deep in the UNet whose spread tells v-prediction training from eps (ComfyUI's heuristic)
V_PRED_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


class SD2Family(UNetFamily):
    id = "sd2"
    label = "SD2.x"
    template = "sd21-v"
    text_prefixes = (SD2_TEXT,)
    text_encoders = ("openclip_h",)
    clip_layer = -2  # the penultimate layer, through the final norm (ComfyUI's SD2 CLIP)
    prediction_from_weights = True

    def prediction(self, header: Mapping[str, TensorInfo], tensor: Any) -> str:
        """epsilon or v_prediction, the way ComfyUI tells them apart (4-channel models only).

        A ``v_pred`` marker tensor decides; otherwise the spread of one norm bias deep in the UNet, which
        training with the v objective leaves much wider. Files where neither tells can be overridden in the
        workflow with a ModelSamplingDiscrete node.
        """
        if self.inpaint or "v_pred" not in header and V_PRED_PROBE not in header:
            return "epsilon"
        if "v_pred" in header:
            return "v_prediction"
        bias = tensor(V_PRED_PROBE).float()
        return "v_prediction" if float(bias.std(unbiased=False)) > 0.09 else "epsilon"

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
        from tui_diffusion.modelfiles.configs import sd2_configs

        return sd2_configs(header, file, prediction)


class SD2InpaintFamily(SD2Family):
    id = "sd2-inpaint"
    label = "SD2.x inpainting"
    inpaint = True
    prediction_from_weights = False  # always epsilon


SD2 = SD2Family()
SD2_INPAINT = SD2InpaintFamily()

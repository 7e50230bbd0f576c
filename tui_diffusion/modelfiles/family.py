"""Which Stable Diffusion family a single-file checkpoint belongs to, from its key names."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_L = "conditioner.embedders.0.transformer."
SDXL_TEXT_G = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_G = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class Family:
    id: str
    label: str
    supported: bool
    #: Why it cannot be loaded, when it cannot.
    reason: str = ""


SD1 = Family("sd1", "SD1.x", True)
SD1_INPAINT = Family("sd1-inpaint", "SD1.x inpainting", True)
SD2 = Family("sd2", "SD2.x", True)
SD2_INPAINT = Family("sd2-inpaint", "SD2.x inpainting", True)
SDXL = Family("sdxl", "SDXL base", True)
SDXL_REFINER = Family("sdxl-refiner", "SDXL refiner", True)


def _any(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


V_PRED_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def detect_family(keys: Iterable[str], in_channels: int | None = None) -> Family:
    """The family of an original-layout checkpoint; an unsupported Family explains what it is."""
    keys = list(keys)
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return Family("flux", "Flux", False, "Flux checkpoints are not supported yet")
    if any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        return Family("sd3", "SD3", False, "SD3 checkpoints are not supported yet")
    if not _any(keys, UNET):
        return Family("unknown", "unknown", False,
                      "no Stable Diffusion UNet in it (no 'model.diffusion_model.*' tensors)")
    if _any(keys, SDXL_TEXT_G) or _any(keys, SDXL_TEXT_L):
        return SDXL
    if _any(keys, SDXL_REFINER_TEXT_G):
        return SDXL_REFINER
    if _any(keys, SD2_TEXT):
        return SD2_INPAINT if in_channels == 9 else SD2
    if _any(keys, SD1_TEXT):
        return SD1_INPAINT if in_channels == 9 else SD1
    return Family("unknown", "unknown", False, "a UNet without a known text encoder layout")

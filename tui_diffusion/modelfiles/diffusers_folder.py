"""Which family a diffusers model folder holds, read from its JSON configs only (torch-free, no weights read).

``model_index.json`` alone cannot tell: SD1.x and SD2.x share ``StableDiffusionPipeline``, and an SDXL base
saved from an img2img pipeline names the refiner's class. The UNet's and the text encoders' configs can:
SDXL's UNet takes ``text_time`` added conditioning, and its refiner has no first text encoder; SD2.x's text
encoder is OpenCLIP-H (``gelu``, 1024 wide) where SD1.x's is OpenAI CLIP-L (``quick_gelu``, 768), and its UNet
uses linear projections in its transformers; a 9-channel UNet is an inpainting one; the scheduler's
``prediction_type`` says epsilon or v. A Hugging Face cache snapshot works the same: its files are symlinks into
``blobs/`` and are read through them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.header import CheckpointError

#: family id -> label, for the families a diffusers folder can hold
LABELS = {"sd1": "SD1.x", "sd1-inpaint": "SD1.x inpainting", "sd2": "SD2.x", "sd2-inpaint": "SD2.x inpainting",
          "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner", "sd3": "SD3", "flux": "Flux"}

# pipelines whose denoiser is a transformer (the families to come), by the class names diffusers gives them
_TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
_PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
                      "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux"}


@dataclass(frozen=True)
class DiffusersFolder:
    """What a diffusers folder holds: its family id (as ``tui_diffusion.families`` names them) and how the
    network predicts (``epsilon``, ``v_prediction`` or ``flow``)."""

    family: str
    prediction: str
    #: the pipeline class its model_index.json names (for messages)
    pipeline: str

    @property
    def label(self) -> str:
        text = LABELS.get(self.family, self.family)
        return f"{text} (v-prediction)" if self.prediction == "v_prediction" else text


def _json(path: Path, required: bool = True) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return {}
        raise CheckpointError(f"{path}: missing (a diffusers model folder needs it)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a config (expected a JSON object)")
    return data


def _component(index: dict[str, Any], name: str) -> bool:
    """Whether model_index.json lists the component (``[library, class]``; null when the pipeline has none)."""
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[1] is not None


def diffusers_folder_family(path: Path) -> DiffusersFolder:
    """The family of the diffusers folder ``path``; CheckpointError names the file that does not tell."""
    path = Path(path)
    index = _json(path / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    if _component(index, "transformer") or pipeline in _PIPELINE_FAMILIES:
        config = _json(path / "transformer" / "config.json", required=False)
        family = _TRANSFORMER_FAMILIES.get(str(config.get("_class_name")), _PIPELINE_FAMILIES.get(pipeline))
        if family is None:
            raise CheckpointError(f"{path}: a diffusers folder of an unknown transformer model ({pipeline})")
        return DiffusersFolder(family, "flow", pipeline)
    if not _component(index, "unet"):
        raise CheckpointError(f"{path / 'model_index.json'}: no UNet or transformer listed ({pipeline or 'no class'})")
    unet = _json(path / "unet" / "config.json")
    scheduler = _json(path / "scheduler" / "scheduler_config.json", required=False)
    prediction = str(scheduler.get("prediction_type") or "epsilon")
    inpaint = unet.get("in_channels") == 9
    if unet.get("addition_embed_type") == "text_time":  # SDXL: pooled text and sizes as added conditioning
        refiner = not _component(index, "text_encoder") or bool(index.get("requires_aesthetics_score"))
        return DiffusersFolder("sdxl-refiner" if refiner else "sdxl", prediction, pipeline)
    text = _json(path / "text_encoder" / "config.json", required=False) if _component(index, "text_encoder") else {}
    sd2 = (unet.get("cross_attention_dim") == 1024 or text.get("hidden_act") == "gelu"
           or bool(unet.get("use_linear_projection")))
    family = ("sd2" if sd2 else "sd1") + ("-inpaint" if inpaint else "")
    return DiffusersFolder(family, prediction, pipeline)


def loadable(info: DiffusersFolder) -> bool:
    """Whether the program can load a diffusers folder of this family (its family is registered)."""
    from tui_diffusion.families import by_id

    try:
        by_id(info.family)
    except KeyError:
        return False
    return True


def folder_family(path: Path) -> Any:
    """The registered ``Family`` object for a diffusers folder; CheckpointError when the family is not (yet)
    supported by the program, naming what the folder holds."""
    from tui_diffusion.families import by_id

    info = diffusers_folder_family(path)
    try:
        return by_id(info.family)
    except KeyError:
        raise CheckpointError(f"{path}: a diffusers folder of {info.label} ({info.pipeline}): this family cannot "
                              "be loaded from a diffusers folder yet") from None

"""One line of facts about a checkpoint, for ``tui-diffusion models``; torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.family import detect_family
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.paths import PICKLE_SUFFIXES

_PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "SD1.x/SD2.x (diffusers folder)",
    "StableDiffusionXLPipeline": "SDXL base (diffusers folder)",
    "StableDiffusionXLImg2ImgPipeline": "SDXL refiner (diffusers folder)",
}


def describe_checkpoint(path: Path, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "path": str(path), "family": "unknown", "supported": False, "error": None}
    if path.is_dir():
        try:
            cls = json.loads((path / "model_index.json").read_text())["_class_name"]
        except (OSError, ValueError, KeyError) as exc:
            row["error"] = f"unreadable model_index.json: {exc}"
            return row
        row["family"] = _PIPELINE_FAMILY.get(cls, cls)
        row["supported"] = cls == "StableDiffusionPipeline"
        return row
    if path.suffix.lower() in PICKLE_SUFFIXES:
        row["error"] = "pickle file: not loaded (use the .safetensors version)"
        return row
    try:
        header = read_header(path)
    except CheckpointError as exc:
        row["error"] = str(exc).removeprefix(f"{path}: ")
        return row
    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight")
    fam = detect_family(header, conv_in.shape[1] if conv_in else None)
    row.update(family=fam.label, supported=fam.supported, error=None if fam.supported else fam.reason)
    row["size_bytes"] = path.stat().st_size
    return row

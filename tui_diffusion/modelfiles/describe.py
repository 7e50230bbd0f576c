"""One line of facts about a checkpoint, for ``tui-diffusion models``; torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.family import V_PRED_PROBE, detect_family
from tui_diffusion.modelfiles.header import CheckpointError, read_header, require_rank
from tui_diffusion.paths import PICKLE_SUFFIXES

_PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "SD1.x/SD2.x (diffusers folder)",
    "StableDiffusionXLPipeline": "SDXL base (diffusers folder)",
    "StableDiffusionXLImg2ImgPipeline": "SDXL refiner (diffusers folder)",
}


def _sd2_prediction(path: Path, header: dict) -> str:
    """The same test the loader makes (a marker, else a norm's spread), read with numpy: no torch here."""
    if "v_pred" in header:
        return "v_prediction"
    if V_PRED_PROBE not in header:
        return "epsilon"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            bias = f.get_tensor(V_PRED_PROBE).astype("float32")
    except Exception:  # e.g. bf16, which numpy cannot hold: the loader still decides
        return "unknown"
    return "v_prediction" if float(bias.std()) > 0.09 else "epsilon"


def describe_checkpoint(path: Path, name: str) -> dict[str, Any]:
    """The facts ``models`` lists for one file or folder. Never raises: a file it cannot read gets a row
    saying why, so that one crafted file cannot hide the others."""
    row: dict[str, Any] = {"name": name, "path": str(path), "family": "unknown", "supported": False, "error": None}
    try:
        return _describe(path, row)
    except CheckpointError as exc:
        row["error"] = str(exc).removeprefix(f"{path}: ")
    except OSError as exc:
        row["error"] = f"cannot read: {exc.strerror or exc}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, MemoryError) as exc:
        row["error"] = f"unreadable ({type(exc).__name__}: {exc})"
    row.update(family="unknown", supported=False)
    return row


def _describe(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    if path.is_dir():
        try:
            cls = json.loads((path / "model_index.json").read_text())["_class_name"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            row["error"] = f"unreadable model_index.json: {exc}"
            return row
        if not isinstance(cls, str):
            row["error"] = "unreadable model_index.json: '_class_name' is not a string"
            return row
        row["family"] = _PIPELINE_FAMILY.get(cls, cls)
        row["supported"] = cls == "StableDiffusionPipeline"
        return row
    if path.suffix.lower() in PICKLE_SUFFIXES:
        row["error"] = "pickle file: not loaded (use the .safetensors version)"
        return row
    header = read_header(path)
    conv_in = require_rank(path, header, "model.diffusion_model.input_blocks.0.0.weight", 4)
    fam = detect_family(header, conv_in.shape[1] if conv_in else None)
    row.update(family=fam.label, supported=fam.supported, error=None if fam.supported else fam.reason)
    if fam.id == "sd2":
        row["prediction"] = _sd2_prediction(path, header)
        row["family"] += " (v-prediction)" if row["prediction"] == "v_prediction" else " (epsilon)"
    row["size_bytes"] = path.stat().st_size
    return row

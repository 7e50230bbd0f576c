"""One line of facts about a checkpoint, for ``tui-diffusion models``; torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.family import V_PRED_PROBE, detect_family
from tui_diffusion.modelfiles.header import CheckpointError, read_header, require_rank
from tui_diffusion.paths import PICKLE_SUFFIXES


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
    if path.is_dir():  # a diffusers folder: its family from its configs, as the loader reads them
        from tui_diffusion.modelfiles.diffusers_folder import diffusers_folder_family, loadable

        try:
            info = diffusers_folder_family(path)
        except CheckpointError as exc:
            row["error"] = str(exc).removeprefix(f"{path}: ")
            return row
        row.update(family=f"{info.label} (diffusers folder)", supported=loadable(info), prediction=info.prediction)
        if not row["supported"]:
            row["error"] = f"{info.label} diffusers folders cannot be loaded yet"
        return row
    if path.suffix.lower() in PICKLE_SUFFIXES:
        row["error"] = "pickle file: not loaded (use the .safetensors version)"
        return row
    header = read_header(path)
    conv_in = require_rank(path, header, "model.diffusion_model.input_blocks.0.0.weight", 4)
    fam = detect_family(header, conv_in.shape[1] if conv_in else None)
    row.update(family=fam.label, supported=fam.supported, error=None if fam.supported else fam.reason)
    if fam.prediction_from_weights:
        row["prediction"] = _sd2_prediction(path, header)
        row["family"] += " (v-prediction)" if row["prediction"] == "v_prediction" else " (epsilon)"
    row["size_bytes"] = path.stat().st_size
    return row

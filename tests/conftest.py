"""Shared fixtures: tiny random-weight SD1.x checkpoints in the original single-file layout.

Nothing here downloads anything; HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = ROOT / "workflows" / "txt2img.json"
TINY = "tiny-sd15.safetensors"
TINY_XL = "tiny-sdxl.safetensors"
TINY_SD2 = "tiny-sd2.safetensors"
TINY_XL_REFINER = "tiny-sdxl-refiner.safetensors"
TINY_INPAINT = "tiny-sd15-inpainting.safetensors"
TINY_SD2_V = "tiny-sd2-v.safetensors"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with a tiny SD1.x single file and the same model as a diffusers folder."""
    from tui_diffusion.pipeline.checkpoint_writer import (
        write_sd1_checkpoint,
        write_sd1_diffusers_folder,
        write_sd2_checkpoint,
        write_sdxl_checkpoint,
        write_sdxl_refiner_checkpoint,
    )

    root = tmp_path_factory.mktemp("models")
    write_sd1_checkpoint(root / "checkpoints" / TINY, seed=0)
    from tui_diffusion.pipeline.checkpoint_writer import TinySD1

    write_sd1_checkpoint(root / "checkpoints" / TINY_INPAINT, TinySD1(in_channels=9), seed=0)
    write_sdxl_checkpoint(root / "checkpoints" / TINY_XL, seed=0)
    write_sdxl_refiner_checkpoint(root / "checkpoints" / TINY_XL_REFINER, seed=0)
    write_sd2_checkpoint(root / "checkpoints" / TINY_SD2, seed=0)
    write_sd2_checkpoint(root / "checkpoints" / TINY_SD2_V, seed=0, v_prediction=True)
    write_sd1_diffusers_folder(root / "checkpoints" / "tiny-sd15-diffusers", seed=0)
    return root


@pytest.fixture()
def tiny_home(tmp_path: Path, models_dir: Path) -> Path:
    """A user's folder: models/checkpoints with the tiny SD1.x file, and the shipped workflows/."""
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "models" / "checkpoints" / TINY)
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_folders(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    os.environ["TUI_DIFFUSION_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ["TUI_DIFFUSION_DB"] = str(tmp_path_factory.mktemp("db") / "history.sqlite3")
    # no test attaches to a server the developer may have running; short: a Unix socket's path is limited
    import tempfile

    os.environ["TUI_DIFFUSION_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="td-run-")


@pytest.fixture(autouse=True)
def _own_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own run history and durable queue: jobs one test leaves behind are never shown as held
    by another."""
    monkeypatch.setenv("TUI_DIFFUSION_DB", str(tmp_path / "history.sqlite3"))


def wait_for(client: object, done: object, timeout: float = 120) -> list:
    """Read a client's events until ``done(event, seen_so_far)`` is true; every event seen, in order."""
    import time

    seen: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = client.next_event(timeout=0.5)  # type: ignore[attr-defined]
        if event is None:
            continue
        seen.append(event)
        if done(event, seen):  # type: ignore[operator]
            return seen
    raise AssertionError(f"timed out; the last events were {seen[-10:]}")


def txt2img(**overrides: object) -> dict:
    """The shipped txt2img workflow at test size, with ``"node.input": value`` overrides."""
    data = json.loads(TXT2IMG.read_text())
    settings = {"4.ckpt_name": TINY, "5.width": 64, "5.height": 64, "3.steps": 4, "3.seed": 1}
    settings.update(overrides)
    for target, value in settings.items():
        node_id, name = target.split(".", 1)
        data[node_id]["inputs"][name] = value
    return data


@pytest.fixture()
def broken_models(tmp_path: Path, models_dir: Path) -> Path:
    """A models folder holding the good tiny file plus a truncated copy and a non-safetensors file."""
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    good = models_dir / "checkpoints" / TINY
    shutil.copy(good, root / "checkpoints" / TINY)
    data = good.read_bytes()
    (root / "checkpoints" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "checkpoints" / "notes.safetensors").write_text("this is not a model\n")
    return root

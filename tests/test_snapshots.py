"""Snapshots of the main screen at 80x24 and 160x48 (SVG files in tests/__snapshots__, reviewed by eye).

Update after an intended change with ``pytest tests/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, TXT2IMG
from tests.fakes import FakeClient
from tui_diffusion.app import TuiDiffusionApp
from tui_diffusion.settings import DevicePolicy, WorkerConfig


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TuiDiffusionApp:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / TINY).write_bytes(b"x")
    shutil.copytree(TXT2IMG.parent, tmp_path / "workflows")
    wf = json.loads(TXT2IMG.read_text())
    wf["4"]["inputs"]["ckpt_name"] = TINY
    (tmp_path / "workflows" / "mine.json").write_text(json.dumps(wf))
    monkeypatch.chdir(tmp_path)
    config = WorkerConfig(models_dir=tmp_path / "models", output_dir=tmp_path / "output", device=DevicePolicy("cpu"))
    return TuiDiffusionApp(Path("workflows/mine.json"), config, client_factory=FakeClient)


async def _ready(pilot) -> None:
    for _ in range(10):
        await pilot.pause(0.05)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_main_screen(snap_compare, app: TuiDiffusionApp, size: tuple[int, int]) -> None:
    assert snap_compare(app, terminal_size=size, run_before=_ready)

"""The terminal app against the real worker and a tiny checkpoint, in Pilot and in a real tmux."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, TXT2IMG
from tui_diffusion.app import TuiDiffusionApp
from tui_diffusion.settings import DevicePolicy, WorkerConfig
from tui_diffusion.widgets.image_pane import ImagePane

pytestmark = pytest.mark.slow


@pytest.fixture()
def home(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "models" / "checkpoints" / TINY)
    (tmp_path / "workflows").mkdir()
    wf = json.loads(TXT2IMG.read_text())
    wf["4"]["inputs"]["ckpt_name"] = TINY
    wf["5"]["inputs"].update(width=64, height=64)
    wf["3"]["inputs"]["steps"] = 6
    (tmp_path / "workflows" / "small.json").write_text(json.dumps(wf, indent=2))
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def test_finished_job_fills_the_image_pane(home: Path) -> None:
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", temp_dir=home / "tmp",
                          device=DevicePolicy("cpu"))
    app = TuiDiffusionApp(Path("workflows/small.json"), config)
    async with app.run_test(size=(160, 48)) as pilot:
        deadline = time.monotonic() + 120
        while "ready" not in app.sub_title and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await pilot.press("ctrl+r")
        pane = app.screen.query_one(ImagePane)
        while pane.path is None and time.monotonic() < deadline:
            await pilot.pause(0.2)
        assert pane.path is not None and pane.path.parent == (home / "output").resolve()
        assert pane.image is not None and pane.image.size == (64, 64)
        job = next(iter(app.screen.book.jobs.values()))
        assert job.status == "done" and job.executed == ["4", "6", "7", "5", "3", "8", "9"]


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", "tui-diffusion-test", *args], capture_output=True, text=True,
                          timeout=20).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_real_app_in_tmux_draws_the_image_in_half_blocks(home: Path) -> None:
    env = f"HF_HUB_OFFLINE=1 COLORTERM=truecolor TUI_DIFFUSION_STATE_DIR={home / 'state'} PYTHONPATH={ROOT}"
    command = f"cd {home} && {env} {sys.executable} -m tui_diffusion workflows/small.json; sleep 5"
    _tmux("kill-server")
    subprocess.run(["tmux", "-L", "tui-diffusion-test", "new-session", "-d", "-x", "100", "-y", "30", command],
                   check=True, timeout=20, env={**os.environ, "TERM": "xterm-256color"})
    try:
        deadline = time.monotonic() + 120
        while "worker ready" not in _tmux("capture-pane", "-p") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "worker ready" in _tmux("capture-pane", "-p")
        _tmux("send-keys", "C-r")
        while "done" not in _tmux("capture-pane", "-p") and time.monotonic() < deadline:
            time.sleep(0.3)
            if "done" not in _tmux("capture-pane", "-p"):
                _tmux("send-keys", "F2")  # 100 columns: the image and queue are one key away
                time.sleep(0.5)
        screen = _tmux("capture-pane", "-p", "-e")
        assert "done" in screen
        # half-block cells with true-colour foreground and background: the image itself
        cells = re.findall(r"\x1b\[[0-9;]*38;2;\d+;\d+;\d+[0-9;]*m(?:\x1b\[[0-9;]*m)*[▀▄]", screen)
        assert len(cells) > 50, screen[-2000:]
        _tmux("send-keys", "C-q")
    finally:
        _tmux("kill-server")

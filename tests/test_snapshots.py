"""Snapshots of the main screen at 80x24, 100x30, 120x40 and 160x48 (SVG files in tests/__snapshots__, reviewed
by eye), a finished job's image at 100x30 and a 40-node ComfyUI template's tree.

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

SIZES = [(80, 24), (100, 30), (120, 40), (160, 48)]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / TINY).write_bytes(b"x")
    shutil.copytree(TXT2IMG.parent, tmp_path / "workflows")
    wf = json.loads(TXT2IMG.read_text())
    wf["4"]["inputs"]["ckpt_name"] = TINY
    (tmp_path / "workflows" / "mine.json").write_text(json.dumps(wf))
    shutil.copy(Path(__file__).parent / "data" / "sdxl-40-nodes.ui.json", tmp_path / "workflows" / "big.ui.json")
    monkeypatch.chdir(tmp_path)
    FakeClient.instances.clear()
    return tmp_path


def make_app(home: Path, workflow: str = "workflows/mine.json") -> TuiDiffusionApp:
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", device=DevicePolicy("cpu"))
    return TuiDiffusionApp(Path(workflow), config, client_factory=FakeClient)


async def _ready(pilot) -> None:
    for _ in range(10):
        await pilot.pause(0.05)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_main_screen(snap_compare, home: Path, size: tuple[int, int]) -> None:
    assert snap_compare(make_app(home), terminal_size=size, run_before=_ready)


def test_finished_job_beside_the_form_at_100x30(snap_compare, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's common SSH window: after ctrl+r the image is on screen with no other key."""
    import types
    import uuid

    # the job id names the image in the pane's title: a fixed one, or the snapshot never matches again
    monkeypatch.setattr("tui_diffusion.runtime.queue.uuid", types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=0x5eed)))
    async def queue_and_finish(pilot) -> None:
        await _ready(pilot)
        await pilot.press("ctrl+r")
        await _ready(pilot)
        fake = FakeClient.instances[-1]
        fake.run_job(fake.submitted[0][0], home / "out")
        await _ready(pilot)

    assert snap_compare(make_app(home), terminal_size=(100, 30), run_before=queue_and_finish)


def test_a_40_node_template_at_120x40(snap_compare, home: Path) -> None:
    async def jump(pilot) -> None:
        await _ready(pilot)
        await pilot.press("slash", *"hires", "enter")
        await _ready(pilot)

    assert snap_compare(make_app(home, "workflows/big.ui.json"), terminal_size=(120, 40), run_before=jump)

"""The first image of a fresh app: the benchmark's app mode (``benchmarks.first_image --app``) and what it
brought to light: the worker's ready event imported torch into the app when unpickled, and a worker told to
stop when the app quits was taken for a crash and replaced."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.fakes import FakeClient
from tui_diffusion.runtime.protocol import WorkerDied
from tui_diffusion.runtime.supervisor import Supervisor
from tui_diffusion.settings import DevicePolicy, WorkerConfig


def test_the_worker_ready_event_unpickles_without_torch(tmp_path: Path) -> None:
    """torch.__version__ is torch's own str subclass: sent as it is, unpickling the event imports torch."""
    from tui_diffusion.pipeline.worker import WorkerEngine

    config = WorkerConfig(device=DevicePolicy("cpu"), models_dir=tmp_path, output_dir=tmp_path / "out",
                          temp_dir=tmp_path / "tmp", record_history=False)
    engine = WorkerEngine(config, lambda event: None)
    try:
        data = pickle.dumps(engine.ready)
    finally:
        engine.close(timeout=1.0)
    assert b"torch" not in data.replace(b"torch_version", b"")
    assert all(type(v) in (str, int, type(None)) for v in vars(engine.ready).values())


def test_a_worker_ending_after_close_is_not_replaced() -> None:
    """The app quits: the worker it told to stop ends, and the runtime must not start another one."""
    FakeClient.instances.clear()
    runtime = Supervisor(WorkerConfig(), FakeClient)
    runtime.start()
    assert runtime.next_event(timeout=1.0) is not None  # ready
    runtime.close(timeout=1.0)
    FakeClient.instances[0].dead = "the worker process ended (exit code 0)"
    with pytest.raises(WorkerDied):
        runtime.next_event(timeout=0.1)
    assert len(FakeClient.instances) == 1


@pytest.mark.slow
def test_the_app_mode_of_the_first_image_benchmark_runs(models_dir: Path, tmp_path: Path) -> None:
    """A launched app (headless) queues the job with its key, shows the image, saves the PNG; every phase is
    reported, and the app never imported torch."""
    out = tmp_path / "app.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.first_image", "--app", "--models", str(models_dir),
                           "--ckpt", TINY, "--size", "64", "--steps", "1", "--repeat", "1", "--think", "0,0.5",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figs = json.loads(out.read_text())
    assert [f["think_s"] for f in figs] == [0.0, 0.5]
    for fig in figs:
        run = fig["runs"][0]
        assert not run["torch_imported"]
        marks = fig["marks_s"]
        assert 0 < marks["first_frame"] <= marks["ready"] <= marks["job_started"] <= marks["job_finished"]
        assert marks["job_finished"] <= marks["shown"] and marks["saved"] <= marks["shown"]
        assert fig["phases_s"]["load"] > 0 and fig["phases_s"]["sample"] > 0
    assert "| load |" in done.stdout and "launch to the image shown" in done.stdout

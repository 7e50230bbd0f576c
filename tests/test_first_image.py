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

from tests.conftest import ROOT, TINY, TXT2IMG
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


def test_the_app_asks_its_worker_to_preload_the_open_workflows_checkpoint(tmp_path: Path) -> None:
    from tui_diffusion.app import TuiDiffusionApp, checkpoints_of

    data = json.loads(TXT2IMG.read_text())
    data["4"]["inputs"]["ckpt_name"] = "mine.safetensors"
    data["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mine.safetensors"}}
    data["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    data["12"] = {"class_type": "CLIPTextEncode", "inputs": {"ckpt_name": "not-a-loader.safetensors"}}
    assert checkpoints_of(data) == ("mine.safetensors", "other.safetensors")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(data))
    app = TuiDiffusionApp(path, WorkerConfig(models_dir=tmp_path / "models"), client_factory=FakeClient)
    assert app.bridge.config.preload == ("mine.safetensors", "other.safetensors")


def test_a_preloaded_checkpoint_is_the_one_the_first_job_uses(models_dir: Path, tmp_path: Path) -> None:
    from tui_diffusion import messages as m
    from tui_diffusion.pipeline.worker import WorkerEngine

    config = WorkerConfig(device=DevicePolicy("cpu"), models_dir=models_dir, output_dir=tmp_path / "out",
                          temp_dir=tmp_path / "tmp", record_history=False)
    engine = WorkerEngine(config, lambda event: None)
    try:
        engine.preload(("missing.safetensors", TINY))  # a missing file is skipped: the job names it
        assert engine.engine.models.loads == 1
        assert len(engine.engine._hashes) == 1  # the first image's metadata names the file's sha256
        data = json.loads(TXT2IMG.read_text())
        data["4"]["inputs"]["ckpt_name"] = TINY
        data["5"]["inputs"].update(width=64, height=64)
        data["3"]["inputs"]["steps"] = 1
        end = engine.run(m.SubmitJob("j1", data), lambda: False)
        assert isinstance(end, m.JobFinished) and end.status == "ok"
        assert engine.engine.models.loads == 1  # the job's loader node found it loaded
    finally:
        engine.close(timeout=1.0)


@pytest.mark.slow
def test_the_app_mode_of_the_first_image_benchmark_runs(models_dir: Path, tmp_path: Path) -> None:
    """A launched app (headless) queues the job with its key, shows the image, saves the PNG; every phase is
    reported, and the app never imported torch."""
    out = tmp_path / "app.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.first_image", "--app", "--models", str(models_dir),
                           "--ckpt", TINY, "--size", "64", "--steps", "1", "--repeat", "1", "--think", "0,0.5",
                           "--preload", "both", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figs = json.loads(out.read_text())
    assert [(f["think_s"], f["preload"]) for f in figs] == [(0.0, False), (0.0, True), (0.5, False), (0.5, True)]
    for fig in figs:
        run = fig["runs"][0]
        assert not run["torch_imported"]
        marks = fig["marks_s"]
        assert 0 < marks["first_frame"] <= marks["ready"] <= marks["job_started"] <= marks["job_finished"]
        assert marks["job_finished"] <= marks["shown"] and marks["saved"] <= marks["shown"]
        assert fig["phases_s"]["load"] > 0 and fig["phases_s"]["sample"] > 0
    assert "| load |" in done.stdout and "launch to the image shown" in done.stdout


@pytest.mark.slow
def test_the_load_imports_mode_compares_a_first_load_with_and_without_the_scipy_cut(models_dir: Path,
                                                                                       tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.first_image", "--load-imports", "--models",
                           str(models_dir), "--ckpt", TINY, "--repeat", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["off"]["scipy_stats"] and not fig["on"]["scipy_stats"]
    assert fig["on"]["modules"] < fig["off"]["modules"]
    assert "before: diffusers' schedulers import scipy.stats" in done.stdout

"""Opt-in pickle loading (weights only), resource bounds, and the --compile switch."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, txt2img
from tui_diffusion.config import ConfigError, resolve
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.settings import DevicePolicy, Limits

CPU = resolve_device(DevicePolicy("cpu"))


def _engine(models: Path, tmp: Path, **kw: object) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(models), tmp / "out", tmp / "tmp", tmp / "cfg", **kw)


@pytest.fixture()
def pickle_models(models_dir: Path, tmp_path: Path) -> Path:
    """A models folder with the tiny checkpoint as a .ckpt (torch.save of its state dict, as the old files)."""
    from safetensors.torch import load_file

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    state = load_file(str(models_dir / "checkpoints" / TINY))
    torch.save({"state_dict": state, "global_step": 1}, root / "checkpoints" / "tiny.ckpt")
    shutil.copy(models_dir / "checkpoints" / TINY, root / "checkpoints" / TINY)
    return root


def test_pickle_checkpoints_are_refused_unless_allowed(pickle_models: Path, tmp_path: Path) -> None:
    data = txt2img(**{"4.ckpt_name": "tiny.ckpt"})
    issues = validate_workflow(Workflow.from_data(data), ModelPaths(pickle_models))
    assert [(i.node_id, i.input) for i in issues] == [("4", "ckpt_name")]
    assert "--allow-pickle" in issues[0].message
    assert validate_workflow(Workflow.from_data(data), ModelPaths(pickle_models), allow_pickle=True) == []
    with pytest.raises(JobError, match="allow-pickle"):
        Executor(_engine(pickle_models, tmp_path)).run(data, Hooks(), lambda: False)


def test_an_allowed_pickle_gives_the_same_image_as_the_safetensors_file(pickle_models: Path,
                                                                          tmp_path: Path) -> None:
    ex = Executor(_engine(pickle_models, tmp_path, allow_pickle=True))
    a = ex.run(txt2img(**{"4.ckpt_name": "tiny.ckpt"}), Hooks(), lambda: False)
    b = ex.run(txt2img(), Hooks(), lambda: False)
    assert a.executed[0] == "4" and b.executed[0] == "4"  # two loads, from two files
    assert np.array_equal(np.asarray(Image.open(a.outputs[0])), np.asarray(Image.open(b.outputs[0])))


def test_an_allowed_pickle_that_would_run_code_is_still_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    for name, payload in (("evil.ckpt", pickle.dumps(Exploit())),):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError, match="refused: this pickle holds more than weights"):
            load_checkpoint(path, CPU, tmp_path, allow_pickle=True)
    zipped = tmp_path / "evil-zip.pt"  # the zip format torch.save writes, with the exploit inside
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit()}, zipped)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(zipped, CPU, tmp_path, allow_pickle=True)
    assert not marker.exists()


def test_limits_stop_a_workflow_before_it_runs(models_dir: Path) -> None:
    limits = Limits(max_side=256, max_batch=2, max_prompt_chars=50)
    data = txt2img(**{"5.width": 512, "5.batch_size": 3, "6.text": "x" * 51})
    issues = validate_workflow(Workflow.from_data(data), ModelPaths(models_dir), limits=limits)
    found = {(i.node_id, i.input): i.message for i in issues}
    assert set(found) == {("5", "width"), ("5", "batch_size"), ("6", "text")}
    assert "max_side" in found[("5", "width")] and "max_batch" in found[("5", "batch_size")]
    assert "51 characters" in found[("6", "text")]
    # the size conditioning of an SDXL prompt allocates nothing: not bounded
    sdxl = txt2img(**{"6.text": "short"})
    sdxl["20"] = {"class_type": "CLIPTextEncodeSDXL",
                  "inputs": {"clip": ["4", 1], "width": 4096, "height": 4096, "crop_w": 0, "crop_h": 0,
                             "target_width": 4096, "target_height": 4096, "text_g": "a", "text_l": "b"}}
    sdxl["3"]["inputs"]["positive"] = ["20", 0]
    sdxl["7"]["inputs"]["text"] = "short"
    assert validate_workflow(Workflow.from_data(sdxl), ModelPaths(models_dir), limits=limits) == []


def test_limits_hold_for_sizes_reached_at_run_time(models_dir: Path, tmp_path: Path) -> None:
    data = txt2img()
    data["10"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                               "scale_by": 4.0}}
    data["8"]["inputs"]["samples"] = ["10", 0]
    ex = Executor(_engine(models_dir, tmp_path, limits=Limits(max_side=128)))
    with pytest.raises(JobError) as caught:
        ex.run(data, Hooks(), lambda: False)
    assert caught.value.node_id == "10" and "256x256" in caught.value.message
    assert not list((tmp_path / "out").glob("*.png"))
    data["10"]["inputs"]["scale_by"] = 2.0
    assert ex.run(data, Hooks(), lambda: False).outputs  # within the bound: runs


def test_boolean_and_limit_settings_resolve_from_env_and_file(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("allow_pickle = true\nmax_side = 1024\n")
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(conf))
    monkeypatch.setenv("TUI_DIFFUSION_COMPILE", "yes")
    s = resolve({})
    config = s.worker_config()
    assert config.allow_pickle is True and config.device.compile is True
    assert config.limits == Limits(max_side=1024)
    monkeypatch.setenv("TUI_DIFFUSION_COMPILE", "maybe")
    with pytest.raises(ConfigError, match="not true or false"):
        resolve({})

"""``tui-diffusion doctor``: the facts a new machine is checked for, with no model loaded and no traceback,
even on a machine where torch or the model folders are broken."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, TINY_XL, TINY_XL_REFINER
from tui_diffusion import cli
from tui_diffusion.config import resolve
from tui_diffusion.doctor import diagnose, render


def _settings(models: Path, **extra: object):
    return resolve({"models_dir": models, **extra})


def test_models_per_folder_with_their_family(models_dir: Path) -> None:
    report = diagnose(_settings(models_dir))
    files = {f["name"]: f for entry in report["folders"]["checkpoints"] for f in entry["files"]}
    assert files[TINY]["family"] == "sd1"
    assert files[TINY_XL]["family"] == "sdxl"
    assert files[TINY_XL_REFINER]["family"] == "sdxl-refiner"
    assert files["tiny-sd2.safetensors"]["family"] == "sd2"
    assert files["tiny-sd15-inpainting.safetensors"]["family"] == "sd1-inpaint"
    assert files["tiny-sd15-diffusers"]["family"] == "sd1"  # a diffusers folder, from its configs


def test_each_shipped_workflow_says_whether_it_can_run_and_what_is_missing(models_dir: Path) -> None:
    flows = {f["name"]: f for f in diagnose(_settings(models_dir))["workflows"]}
    assert flows["sdxl-refiner"]["can_run"]
    assert flows["sdxl-refiner"]["set"] == [f"4.ckpt_name={TINY_XL}", f"12.ckpt_name={TINY_XL_REFINER}"]
    assert flows["txt2img"]["can_run"]
    assert not flows["lora"]["can_run"]
    assert flows["lora"]["missing"] == [f"node 10 'Load LoRA', input 'lora_name': a LoRA in {models_dir / 'loras'}"]


def test_only_the_right_family_makes_a_workflow_runnable(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "checkpoints" / TINY)
    flows = {f["name"]: f for f in diagnose(_settings(tmp_path))["workflows"]}
    assert flows["txt2img"]["can_run"] and flows["txt2img"]["set"] == [f"4.ckpt_name={TINY}"]
    assert not flows["sdxl"]["can_run"]
    assert "SDXL base" in flows["sdxl"]["missing"][0]


def test_the_device_and_the_defaults_it_will_use(models_dir: Path) -> None:
    worker = diagnose(_settings(models_dir, device="cpu"))["worker"]  # this machine may have a GPU
    assert worker["torch"] and worker["device"]["device"] == "cpu"
    assert worker["device"]["precision"] == "float32" and worker["device"]["offload"] == "none"
    lowvram = diagnose(_settings(models_dir, device="cpu", memory="lowvram", precision="bf16"))["worker"]["device"]
    assert lowvram["precision"] == "bfloat16" and lowvram["vae_tiling"]


def test_cli_text_and_json(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--models-dir", str(models_dir), "--json"]) == cli.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert {"worker", "folders", "workflows", "models_dir"} <= set(report)
    assert cli.main(["doctor", "--models-dir", str(models_dir), "--cpu"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "the worker will use: CPU (cpu), float32" in out
    assert "txt2img: can run: tui-diffusion run txt2img --set 4.ckpt_name=" in out


def test_a_bare_machine_gets_a_report_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """No torch, no models folder, an unreadable extra_model_paths.yaml and a file that is not a model."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "junk.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "bad.yaml").write_text(": : [")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["doctor", "--extra-model-paths", "bad.yaml"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "torch cannot be imported" in out
    assert "bad.yaml" in out and "Traceback" not in out
    assert cli.main(["doctor"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "junk.safetensors  unreadable" in out
    assert "txt2img: missing node 4 'Load Checkpoint', input 'ckpt_name'" in out
    report = diagnose(_settings(tmp_path / "nowhere"))
    assert all(not entry["exists"] for entry in report["folders"]["checkpoints"])
    assert "Shipped workflows" in render(report)

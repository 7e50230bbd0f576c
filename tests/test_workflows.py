"""Every shipped workflow validates once its model names are set, and runs headless on tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, TINY, TINY_XL, TINY_XL_REFINER

#: the SD3.5 and Flux workflows need transformer, text encoder and VAE files: tests/test_flux.py runs them
DIT_WORKFLOWS = {"sd3.5.json", "flux-dev.json", "flux-schnell.json"}
WORKFLOWS = sorted(p.name for p in (ROOT / "workflows").glob("*.json") if p.name not in DIT_WORKFLOWS)

SETTINGS: dict[str, dict[str, str]] = {
    "txt2img.json": {"4.ckpt_name": TINY, "5.width": "64", "5.height": "64", "3.steps": "2"},
    "img2img.json": {"4.ckpt_name": TINY, "3.steps": "2"},
    "inpaint.json": {"4.ckpt_name": TINY, "3.steps": "2"},
    "hires-fix.json": {"4.ckpt_name": TINY, "5.width": "64", "5.height": "64", "3.steps": "2", "11.steps": "2"},
    "lora.json": {"4.ckpt_name": TINY, "10.lora_name": "tiny-lora.safetensors", "5.width": "64",
                  "5.height": "64", "3.steps": "2"},
    "sdxl.json": {"4.ckpt_name": TINY_XL, "5.width": "64", "5.height": "64", "3.steps": "2"},
    "sdxl-refiner.json": {"4.ckpt_name": TINY_XL, "12.ckpt_name": TINY_XL_REFINER, "5.width": "64",
                          "5.height": "64", "10.steps": "4", "11.steps": "4", "10.end_at_step": "3",
                          "11.start_at_step": "3"},
}


@pytest.fixture(scope="module")
def home(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tui_diffusion.pipeline.checkpoint_writer import write_kohya_lora
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.settings import DevicePolicy

    root = tmp_path_factory.mktemp("home")
    (root / "models").mkdir()
    (root / "models" / "checkpoints").symlink_to(models_dir / "checkpoints")
    sd1 = load_checkpoint(models_dir / "checkpoints" / TINY, resolve_device(DevicePolicy("cpu")), root / "cfg")
    write_kohya_lora(root / "models" / "loras" / "tiny-lora.safetensors", sd1.model.unet,
                     [e.model for e in sd1.clip.encoders])
    (root / "input").mkdir()
    rgba = np.random.default_rng(1).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[20:40, 20:40, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "input" / "example.png")
    return root


def test_every_workflow_is_covered() -> None:
    assert set(WORKFLOWS) == set(SETTINGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_workflow_validates_and_runs(home: Path, name: str) -> None:
    sets = [arg for target, value in SETTINGS[name].items() for arg in ("--set", f"{target}={value}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "tui_diffusion"]
    path = str(ROOT / "workflows" / name)
    valid = subprocess.run([*base, "validate", path, *sets], cwd=home, env=env, capture_output=True, text=True)
    assert valid.returncode == 0, valid.stderr
    out = subprocess.run([*base, "run", path, *sets, "--json", "--cpu"], cwd=home, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["status"] == "ok" and record["outputs"]
    assert all(Path(p).is_file() for p in record["outputs"])


@pytest.mark.slow
def test_a_comfyui_ui_file_with_primitive_and_reroutes_runs_and_its_png_carries_the_graph(home: Path) -> None:
    from tui_diffusion.graph.a1111 import parse_parameters

    ui_file = Path(__file__).parent / "data" / "sdxl-primitive-reroute.ui.json"
    sets = ["--set", f"4.ckpt_name={TINY_XL}", "--set", f"12.ckpt_name={TINY_XL_REFINER}",
            "--set", "5.width=64", "--set", "5.height=64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "tui_diffusion"]
    valid = subprocess.run([*base, "validate", str(ui_file), *sets], cwd=home, env=env, capture_output=True, text=True)
    assert valid.returncode == 0, valid.stderr
    out = subprocess.run([*base, "run", str(ui_file), *sets, "--json"], cwd=home, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    png = Image.open(json.loads(out.stdout)["outputs"][0])
    ui = json.loads(png.text["workflow"])
    assert {n["type"] for n in ui["nodes"]} >= {"KSamplerAdvanced", "CLIPTextEncodeSDXLRefiner", "SaveImage"}
    assert all(len(link) == 6 for link in ui["links"])
    fields = parse_parameters(png.text["parameters"])
    assert fields["prompt"] == "a cabin in the woods, (snow:1.2)" and fields["negative"] == "blurry"
    assert fields["fields"]["Seed"] == "42" and fields["fields"]["Steps"] == "25"
    assert fields["fields"]["Model"] == "tiny-sdxl" and len(fields["fields"]["Model hash"]) == 10

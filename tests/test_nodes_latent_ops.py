"""Latent transforms against hand-computed values, and ComfyUI's .latent files written and read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY
from tests.test_nodes_more import output, run
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.nodes_latent_ops import (
    latent_blend,
    latent_composite,
    latent_composite_masked,
    latent_crop,
    latent_flip,
    latent_rotate,
    load_latent,
    save_latent,
)
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
CTX = NodeContext(None, "1", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]


def lat(result: object) -> torch.Tensor:
    return result.outputs[0]["samples"]  # type: ignore[attr-defined]


def engine(tmp_path: Path, models: Path | None = None) -> EngineState:
    (tmp_path / "in").mkdir(exist_ok=True)
    return EngineState(CPU, ModelCache(2), ModelPaths(models or tmp_path / "models", tmp_path / "in"),
                       tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")


def test_composite_pastes_at_pixel_positions() -> None:
    to = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [3]}
    src = {"samples": torch.ones(1, 4, 4, 4)}
    result = latent_composite(CTX, to, src, 48, 16, 0).outputs[0]
    expected = torch.zeros(1, 4, 8, 8)
    expected[:, :, 2:6, 6:8] = 1.0  # x 48 px = 6 latent columns; the part beyond the edge is dropped
    assert torch.equal(result["samples"], expected) and result["batch_index"] == [3]
    assert to["samples"].sum() == 0


def test_composite_feather_ramps_on_inner_sides_only() -> None:
    """feather 16 px = 2 latent pixels: factors 1/2, 1 from each side that is not the destination's border."""
    to, src = {"samples": torch.zeros(1, 1, 8, 8)}, {"samples": torch.ones(1, 1, 4, 4)}
    inner = lat(latent_composite(CTX, to, src, 16, 16, 16))[0, 0, 2:6, 2:6]
    ramp = torch.tensor([0.5, 1.0, 1.0, 0.5])
    assert torch.allclose(inner, ramp[:, None] * ramp[None, :])
    corner = lat(latent_composite(CTX, to, src, 0, 0, 16))[0, 0, :4, :4]  # top and left are the border
    ramp_end = torch.tensor([1.0, 1.0, 1.0, 0.5])
    assert torch.allclose(corner, ramp_end[:, None] * ramp_end[None, :])


def test_composite_masked_with_and_without_mask() -> None:
    dest, src = {"samples": torch.zeros(2, 4, 6, 6)}, {"samples": torch.ones(1, 4, 2, 2)}
    plain = lat(latent_composite_masked(CTX, dest, src, 8, 32))
    expected = torch.zeros(2, 4, 6, 6)
    expected[:, :, 4:6, 1:3] = 1.0  # the source repeated to the destination's batch
    assert torch.equal(plain, expected)
    mask = torch.tensor([[1.0, 0.0], [0.25, 0.5]])
    masked = lat(latent_composite_masked(CTX, dest, src, 0, 0, False, mask))
    assert torch.allclose(masked[0, 0, :2, :2], mask)
    assert torch.equal(lat(latent_composite_masked(CTX, dest, src, 0, 0, True)), torch.ones(2, 4, 6, 6))
    with pytest.raises(NodeError, match="channels"):
        latent_composite_masked(CTX, dest, {"samples": torch.ones(1, 16, 2, 2)}, 0, 0)


def test_blend() -> None:
    a, b = torch.full((1, 4, 4, 4), 2.0), torch.full((1, 4, 4, 4), -1.0)
    assert torch.allclose(lat(latent_blend(CTX, {"samples": a}, {"samples": b}, 0.3)), torch.full_like(a, -0.1))
    c = torch.rand(1, 4, 2, 4)  # another size: bicubic to a's, centre-cropped
    expected = 0.5 * a + 0.5 * F.interpolate(c[:, :, :, 1:3], size=(4, 4), mode="bicubic")
    assert torch.allclose(lat(latent_blend(CTX, {"samples": a}, {"samples": c}, 0.5)), expected)


def test_crop_flip_rotate() -> None:
    samples = torch.arange(2 * 4 * 10 * 12, dtype=torch.float32).reshape(2, 4, 10, 12)
    assert torch.equal(lat(latent_crop(CTX, {"samples": samples}, 64, 40, 16, 8)), samples[:, :, 1:6, 2:10])
    # the corner stays 8 latent pixels (64 px) from the far edges
    assert torch.equal(lat(latent_crop(CTX, {"samples": samples}, 64, 64, 400, 400)), samples[:, :, 2:10, 4:12])
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 1, 2, 2)
    assert lat(latent_flip(CTX, {"samples": grid}, "x-axis: vertically"))[0, 0].tolist() == [[3, 4], [1, 2]]
    assert lat(latent_flip(CTX, {"samples": grid}, "y-axis: horizontally"))[0, 0].tolist() == [[2, 1], [4, 3]]
    assert lat(latent_rotate(CTX, {"samples": grid}, "90 degrees"))[0, 0].tolist() == [[3, 1], [4, 2]]  # clockwise
    assert lat(latent_rotate(CTX, {"samples": grid}, "180 degrees"))[0, 0].tolist() == [[4, 3], [2, 1]]
    assert lat(latent_rotate(CTX, {"samples": grid}, "270 degrees"))[0, 0].tolist() == [[2, 4], [1, 3]]
    assert lat(latent_rotate(CTX, {"samples": samples}, "90 degrees")).shape == (2, 4, 12, 10)


def test_save_latent_writes_comfyuis_file(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    wf = {"5": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "latents/ComfyUI"}}}
    ctx = NodeContext(eng, "5", wf, report=lambda *a: None, interrupted=lambda: False)
    samples = torch.randn(2, 4, 3, 5)
    first = save_latent(ctx, {"samples": samples}).files
    second = save_latent(ctx, {"samples": samples * 2}).files
    assert [Path(p).relative_to(tmp_path / "out").as_posix() for p in first + second] == [
        "latents/ComfyUI_00001_.latent", "latents/ComfyUI_00002_.latent"]
    with safe_open(first[0], framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert torch.equal(f.get_tensor("latent_tensor"), samples)
        assert json.loads(f.metadata()["prompt"]) == wf and "workflow" in f.metadata()
    with pytest.raises(NodeError, match="outside"):
        save_latent(ctx, {"samples": samples}, "../escape")
    bad = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "/tmp/x"}}}
    assert "absolute" in validate_workflow(Workflow.from_data(bad))[0].message


def test_load_latent_scales_old_files(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    samples = torch.randn(1, 4, 3, 3)
    save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, str(tmp_path / "in/new.latent"))
    save_file({"latent_tensor": samples}, str(tmp_path / "in/old.latent"))  # before the marker: scaled by 0.18215
    ctx = NodeContext(eng, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    assert torch.equal(lat(load_latent(ctx, "new.latent")), samples)
    assert torch.allclose(lat(load_latent(ctx, "old.latent")), samples / 0.18215)
    save_file({"other": samples}, str(tmp_path / "in/odd.latent"))
    with pytest.raises(NodeError, match="no 'latent_tensor'"):
        load_latent(ctx, "odd.latent")
    (tmp_path / "in/broken.latent").write_bytes(b"\x00" * 20)
    with pytest.raises(NodeError, match="broken.latent: not a readable"):
        load_latent(ctx, "broken.latent")
    with pytest.raises(NodeError, match="not found"):
        load_latent(ctx, "missing.latent")
    assert eng.paths.list("input_latents") == ["broken.latent", "new.latent", "odd.latent", "old.latent"]


def test_workflow_saves_and_loads_latents_of_the_tiny_checkpoint(models_dir: Path, tmp_path: Path) -> None:
    """LoadImage -> VAEEncode -> LatentFlip -> SaveLatent; the file moved to the input folder; then
    LoadLatent -> LatentRotate (twice 180 = none) -> VAEDecode -> SaveImage, through the executor."""
    eng = engine(tmp_path, models_dir)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in" / "x.png")
    save = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
            "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
            "4": {"class_type": "LatentFlip", "inputs": {"samples": ["3", 0], "flip_method": "y-axis: horizontally"}},
            "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/t"}}}
    ex = Executor(eng)
    report = run(ex, save)
    assert [Path(p).name for p in report.outputs] == ["t_00001_.latent"]
    flipped = output(ex, save, "4")["samples"]
    shutil.copy(report.outputs[0], tmp_path / "in" / "t.latent")
    load = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "t.latent"}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
            "3": {"class_type": "LatentRotate", "inputs": {"samples": ["1", 0], "rotation": "180 degrees"}},
            "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 2]}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "back"}}}
    report = run(ex, load)
    assert torch.equal(output(ex, load, "1")["samples"], flipped)
    assert torch.equal(output(ex, load, "3")["samples"], torch.rot90(flipped, 2, dims=[3, 2]))
    assert Image.open(report.outputs[0]).size == (32, 32)
    missing = dict(load, **{"1": {"class_type": "LoadLatent", "inputs": {"latent": "nope.latent"}}})
    assert "nope.latent" in validate_workflow(Workflow.from_data(missing), eng.paths)[0].message

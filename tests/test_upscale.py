"""Upscale models through spandrel: tiny random-weight models in real layouts (ESRGAN's original keys, Real-ESRGAN's
``params_ema`` .pth, Real-ESRGAN Compact), loaded as files, equal to spandrel's own model run directly."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_nodes_more import run
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, JobError
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.upscale import (
    image_upscale_with_model,
    load_upscale_model,
    spandrel_module,
    tile_count,
    tiled_scale,
    upscale_image,
    upscale_model_loader,
)
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
# spandrel is the optional "upscale" extra (.ci/run installs it); imported here through spandrel_module, which
# also works where torchvision cannot be imported
pytestmark = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None, reason="spandrel is not installed")


@pytest.fixture(scope="module")
def arch() -> object:
    spandrel_module()  # imports spandrel (with its torchvision stand-in where torchvision cannot load)
    from spandrel.architectures import ESRGAN, Compact

    return type("Arch", (), {"ESRGAN": ESRGAN.ESRGAN, "Compact": Compact.Compact})


def esrgan(arch: object, scale: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return arch.ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()


def compact(arch: object, scale: int = 2, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return arch.Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale).eval()


def to_real_esrgan_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESRGAN's original keys renamed to Real-ESRGAN's RRDBNet (x4: conv_first, body.N.rdbK.convJ, conv_body,
    conv_up1, conv_up2, conv_hr, conv_last), the layout of RealESRGAN_x4plus.pth."""
    fixed = {"model.0": "conv_first", "model.3": "conv_up1", "model.6": "conv_up2", "model.8": "conv_hr",
             "model.10": "conv_last"}
    blocks = max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    fixed[f"model.1.sub.{blocks}"] = "conv_body"
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        else:
            prefix, _, leaf = key.rpartition(".")
            out[f"{fixed[prefix]}.{leaf}"] = value
    return out


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def direct(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(image.movedim(-1, 1)).movedim(1, -1).clamp(0, 1)


def engine_for(tmp_path: Path, allow_pickle: bool = False) -> EngineState:
    (tmp_path / "input").mkdir(exist_ok=True)
    return EngineState(CPU, ModelCache(2), ModelPaths(tmp_path / "models", tmp_path / "input"), tmp_path / "out",
                       tmp_path / "tmp", tmp_path / "cfg", allow_pickle=allow_pickle)


def ctx(engine: EngineState) -> NodeContext:
    return NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)


def test_esrgan_safetensors_loads_and_upscales_as_spandrel_does(arch: object, tmp_path: Path) -> None:
    model = esrgan(arch)
    save_safetensors(model, tmp_path / "models" / "upscale_models" / "4x-tiny.safetensors")
    engine = engine_for(tmp_path)
    (loaded,) = upscale_model_loader(ctx(engine), "4x-tiny.safetensors").outputs
    assert loaded.architecture.name == "ESRGAN" and loaded.scale == 4
    image = torch.rand(2, 24, 20, 3, generator=torch.Generator().manual_seed(0))
    (out,) = image_upscale_with_model(ctx(engine), loaded, image).outputs
    assert out.shape == (2, 96, 80, 3)
    assert torch.equal(out, direct(model, image))  # one tile: exactly the model's output
    # loaded once: the second loader call takes the cached model
    assert upscale_model_loader(ctx(engine), "4x-tiny.safetensors").outputs[0] is loaded


def test_tiles_blend_to_the_untiled_result(arch: object, tmp_path: Path) -> None:
    """Compact x2 on 48x80 in 32-pixel tiles overlapping by 8: close to the whole image at once (the tiles see
    less context at their seams), with the scale right."""
    model = compact(arch)
    loaded = load_upscale_model(save_safetensors(model, tmp_path / "c.safetensors"))
    assert loaded.architecture.name == "RealESRGAN Compact" and loaded.scale == 2
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(1))
    steps = []
    out = upscale_image(loaded, image, torch.device("cpu"), tile=32, overlap=8,
                        progress=lambda s, t: steps.append((s, t)))
    whole = direct(model, image)
    assert out.shape == whole.shape == (1, 96, 160, 3)
    assert (out - whole).abs().mean() < 2e-3 and (out - whole).abs().max() < 5e-2
    assert steps[-1] == (tile_count(48, 80, 32, 8), tile_count(48, 80, 32, 8)) == (2 * 3, 6)


def test_tiled_scale_weights_sum_to_one() -> None:
    """A pixel-wise function tiled gives exactly what it gives on the whole image: the feathered weights of
    overlapping tiles are normalised everywhere (ComfyUI's grid: starts every tile - overlap pixels)."""
    image = torch.rand(2, 3, 70, 45, generator=torch.Generator().manual_seed(2))

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3) * 0.5

    tiles = []
    out = tiled_scale(image, lambda t: tiles.append(t.shape[-2:]) or up(t), tile=32, overlap=8, scale=3,
                      out_channels=3)
    assert torch.allclose(out, up(image), atol=1e-6)
    # rows start at 0, 24 (range(0, 70 - 8, 24) = 0, 24, 48), columns at 0, 24; the last ones are clipped
    assert tiles[:6] == [(32, 32), (32, 21), (32, 32), (32, 21), (22, 32), (22, 21)]
    assert len(tiles) == 2 * tile_count(70, 45, 32, 8) == 12


def test_out_of_memory_halves_the_tile_down_to_128(tmp_path: Path) -> None:
    seen: list[int] = []

    class Fussy:
        """An upscale model double: nearest x2, out of memory on inputs over 150 pixels a side."""

        scale, input_channels, output_channels = 2, 3, 3

        def __init__(self, limit: int) -> None:
            self.limit = limit

        def to(self, device: object) -> Fussy:
            return self

        def __call__(self, t: torch.Tensor) -> torch.Tensor:
            seen.append(max(t.shape[-2:]))
            if max(t.shape[-2:]) > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
            return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    image = torch.rand(1, 300, 260, 3, generator=torch.Generator().manual_seed(3))
    out = upscale_image(Fussy(150), image, torch.device("cpu"))
    assert torch.allclose(out, image.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert seen[0] == 300 and 256 in seen and max(seen[seen.index(128):]) == 128  # 512 -> 256 -> 128
    with pytest.raises(torch.cuda.OutOfMemoryError):
        upscale_image(Fussy(100), image, torch.device("cpu"))  # not even 128-pixel tiles fit: the error stands


def test_real_esrgan_pth_follows_the_pickle_policy(arch: object, tmp_path: Path) -> None:
    model = esrgan(arch, seed=4)
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    torch.save({"params_ema": to_real_esrgan_keys(model.state_dict())}, folder / "RealESRGAN_x4plus_tiny.pth")
    data = {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "RealESRGAN_x4plus_tiny.pth"}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": 0}},
            "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    issues = validate_workflow(Workflow.from_data(data), ModelPaths(tmp_path / "models"))
    assert len(issues) == 1 and "--allow-pickle" in issues[0].message
    with pytest.raises(NodeError, match="allow-pickle"):
        upscale_model_loader(ctx(engine_for(tmp_path)), "RealESRGAN_x4plus_tiny.pth")
    (loaded,) = upscale_model_loader(ctx(engine_for(tmp_path, allow_pickle=True)), "RealESRGAN_x4plus_tiny.pth").outputs
    image = torch.rand(1, 12, 16, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(upscale_image(loaded, image, torch.device("cpu")), direct(model, image))


def test_a_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    torch.save({"model.0.weight": torch.zeros(1), "extra": Path("x")}, folder / "bad.pth")
    with pytest.raises(NodeError, match="more than weights"):
        upscale_model_loader(ctx(engine_for(tmp_path, allow_pickle=True)), "bad.pth")


def test_files_that_are_not_upscale_models_say_so(tmp_path: Path) -> None:
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(NodeError, match="not an upscale model architecture"):
        load_upscale_model(tmp_path / "vae.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(NodeError, match="cannot read it as safetensors"):
        load_upscale_model(tmp_path / "junk.safetensors")


def test_channel_mismatch_is_a_clear_error(arch: object, tmp_path: Path) -> None:
    loaded = load_upscale_model(save_safetensors(compact(arch), tmp_path / "c.safetensors"))
    with pytest.raises(NodeError, match="3-channel images; the image has 4"):
        image_upscale_with_model(ctx(engine_for(tmp_path)), loaded, torch.rand(1, 8, 8, 4))


def test_workflow_upscales_a_loaded_image(arch: object, tmp_path: Path) -> None:
    """LoadImage -> ImageUpscaleWithModel (Compact x2 from upscale_models/) -> SaveImage, through the executor."""
    model = compact(arch, seed=6)
    save_safetensors(model, tmp_path / "models" / "upscale_models" / "2x-compact.safetensors")
    engine = engine_for(tmp_path)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "input" / "small.png")
    data = {"1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x-compact.safetensors"}},
            "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up/x"}}}
    report = run(Executor(engine), data)
    assert [Path(p).name for p in report.outputs] == ["x_00001_.png"]
    saved = np.asarray(Image.open(report.outputs[0]))
    expected = direct(model, torch.from_numpy(rgb.astype(np.float32) / 255)[None])[0]
    assert saved.shape == (40, 56, 3)
    assert np.abs(saved.astype(int) - expected.mul(255).round().numpy().astype(int)).max() <= 1
    data["2"]["inputs"]["model_name"] = "missing.safetensors"
    with pytest.raises(JobError, match="missing.safetensors"):
        run(Executor(engine), data)


def test_no_torchvision_stand_in_is_left_behind() -> None:
    """Where torchvision cannot be imported spandrel loads with a stand-in for it; afterwards the name is free
    again, so transformers and diffusers do not mistake the stand-in for torchvision."""
    import sys

    spandrel_module()
    assert "torchvision" not in sys.modules or hasattr(sys.modules["torchvision"], "__version__")
    assert "spandrel" in sys.modules


def test_upscaling_stops_between_tiles_when_interrupted(arch: object, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.errors import Interrupted

    loaded = load_upscale_model(save_safetensors(compact(arch), tmp_path / "c.safetensors"))
    calls: list[int] = []
    runs: list[tuple[int, ...]] = []
    loaded.model.register_forward_hook(lambda module, args, output: runs.append(tuple(args[0].shape)))
    stop = NodeContext(engine_for(tmp_path), "1", {}, report=lambda step, total, _: calls.append(step),
                       interrupted=lambda: len(calls) > 0)
    with pytest.raises(Interrupted):
        image_upscale_with_model(stop, loaded, torch.rand(1, 600, 40, 3))  # two 512-pixel tiles
    assert calls == [1] and runs == [(1, 3, 512, 40)]  # the second tile never ran

"""Comfy Org's earlier published templates of ControlNets, T2I-Adapters and GLIGEN (``public/templates`` of the
frontend repository, ComfyUI_examples' workflows; copied unchanged into ``tests/data/frontend_templates/control/``)
import from ComfyUI's UI format, validate with nothing missing and run on tiny random-weight files of the right
architectures in their published layouts, placed under the names the templates expect (issue 16, "Done when").
The ``.ckpt`` and ``.pth`` files they name are pickles, run with pickles allowed (``--allow-pickle``). Sizes and
steps are made small with the overrides ``tui-diffusion run --set`` applies; nothing else is changed. Each template's
point is checked against the same run without it: the control, the adapter or the boxes change the image.

Runtime: about 20 s on 2 CPU cores (the module's files are written once, in about 9 s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from tests.dit_helpers import CPU
from tests.test_examples import _as_ckpt, check_saved

if TYPE_CHECKING:
    from tui_diffusion.pipeline.models import ModelCache

CONTROL = Path(__file__).parent / "data" / "frontend_templates" / "control"

#: template -> the inputs set small (node id -> values), as ``--set`` would; and the saved images' (width, height),
#: one per SaveImage, in any order
CASES: dict[str, tuple[dict[str, dict], list[tuple[int, int]]]] = {
    # SD1 .ckpt, a scribble ControlNet (ControlNetApply 0.9), a separate VAE, uni_pc
    "controlnet_example": ({"5": {"width": 64, "height": 64}, "3": {"steps": 2}}, [(64, 64)]),
    # kohya's difference ControlNet (DiffControlNetLoader adds the model's weights), uni_pc_bh2; sizes / 8
    "depth_controlnet": ({"5": {"width": 104, "height": 48}, "3": {"steps": 2}}, [(104, 48)]),
    # TencentARC's depth T2I-Adapter, a .pth in controlnet/, loaded by ControlNetLoader; SD1.5 .ckpt; sizes / 8
    "depth_t2i_adapter": ({"5": {"width": 104, "height": 48}, "3": {"steps": 2}}, [(104, 48)]),
    # two ControlNets chained (openpose at 1, scribble at 0.8), a .ckpt VAE, dpmpp_sde
    "mixing_controlnets": ({"5": {"width": 64, "height": 64}, "3": {"steps": 2}}, [(64, 64)]),
    # pose ControlNet on a .ckpt with CLIPSetLastLayer -2, LatentUpscale x1.5 and a second pass on another
    # checkpoint at denoise 0.52; both passes saved; sizes / 8
    "2_pass_pose_worship": ({"5": {"width": 160, "height": 88}, "14": {"width": 240, "height": 136},
                             "3": {"steps": 2}, "16": {"steps": 2}}, [(160, 88), (240, 136)]),
    # GLIGEN text boxes (two GLIGENTextBoxApply chained); the image and the boxes / 8
    "gligen_textbox_example": ({"5": {"width": 96, "height": 96}, "3": {"steps": 2},
                                "27": {"width": 18, "height": 18, "x": 52, "y": 2},
                                "21": {"width": 24, "height": 38, "x": 22, "y": 34}}, [(96, 96)]),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A models folder and an input folder holding what the templates name."""
    from safetensors.torch import load_file, save_file

    from tui_diffusion.pipeline.checkpoint_writer import TinySD1, build_sd1_models, write_sd1_checkpoint
    from tui_diffusion.pipeline.checkpoint_writer_controlnet import (
        adapter_to_original,
        build_controlnet,
        build_t2i_adapter,
        write_controlnet,
    )
    from tui_diffusion.pipeline.checkpoint_writer_gligen import gligen_state_dict, write_gligen
    from tui_diffusion.pipeline.checkpoint_writer_lotus import write_sd_vae

    root = Path(tmp_path_factory.mktemp("frontend-control"))
    models, work = root / "models", root / "work"
    checkpoints = models / "checkpoints"
    checkpoints.mkdir(parents=True)
    tiny = models_dir / "checkpoints" / TINY
    for name in ("v1-5-pruned-emaonly-fp16.safetensors", "AOM3A1.safetensors"):
        (checkpoints / name).symlink_to(tiny)
    write_sd1_checkpoint(checkpoints / "AOM3A3.safetensors", seed=1)  # the second pass's other model
    for name in ("Anything-V3.0.ckpt", "v1-5-pruned-emaonly.ckpt"):
        copy = work / f"{name}.safetensors"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(tiny.read_bytes())
        _as_ckpt(copy, checkpoints / name)
    write_sd_vae(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    _as_ckpt(write_sd_vae(work / "anime-vae.safetensors", seed=2), models / "vae" / "kl-f8-anime2.ckpt")
    unet = build_sd1_models(TinySD1(), seed=0)[0]  # the architecture of the tiny SD1.5 checkpoints
    control = models / "controlnet"
    # fp16 ControlNet 1.1 files in the original layout: with the ``control_model.`` prefix and without it (both
    # occur in published files; ComfyUI reads either)
    write_controlnet(control / "control_v11p_sd15_scribble_fp16.safetensors", build_controlnet(unet, seed=3),
                     dtype=torch.float16)
    openpose = write_controlnet(work / "openpose.safetensors", build_controlnet(unet, seed=4), dtype=torch.float16)
    save_file({k.removeprefix("control_model."): v for k, v in load_file(str(openpose)).items()},
              str(control / "control_v11p_sd15_openpose_fp16.safetensors"))
    # kohya's difference file, and the same ControlNet whole (for the comparison below; no template names it)
    depth = build_controlnet(unet, seed=5)
    write_controlnet(control / "diff_control_sd15_depth_fp16.safetensors", depth, difference_to=unet,
                     dtype=torch.float16)
    write_controlnet(control / "depth-whole.safetensors", depth)
    # TencentARC's depth adapter: a pickle of the original layout's state dict, as published
    adapter = build_t2i_adapter(TinySD1().unet_channels, seed=6)
    torch.save(adapter_to_original(adapter.state_dict()), control / "t2iadapter_depth_sd14v1.pth")
    write_gligen(models / "gligen" / "gligen_sd14_textbox_pruned.safetensors",
                 gligen_state_dict(unet, TinySD1().text_width, seed=7))
    assert load_file(str(control / "control_v11p_sd15_scribble_fp16.safetensors"))[
        "control_model.input_hint_block.0.weight"].dtype == torch.float16
    assert "input_hint_block.0.weight" in load_file(str(control / "control_v11p_sd15_openpose_fp16.safetensors"))
    rng = np.random.default_rng(0)
    (root / "input").mkdir()
    for name, (height, width) in (("input_scribble_example.png", (72, 56)), ("shark_depthmap.png", (40, 96)),
                                  ("pose_present.png", (64, 48)), ("house_scribble.png", (48, 64)),
                                  ("pose_worship.png", (80, 144))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "input" / name)
    return root


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One model cache for the module: each file loads once, whichever run needs it first."""
    from tui_diffusion.pipeline.models import ModelCache

    return ModelCache(8)


def _api(name: str, overrides: dict[str, dict] | None = None) -> dict:
    """The template in ComfyUI's API format, with the case's small sizes and steps (and ``overrides``)."""
    from tui_diffusion.graph.ui_format import ui_to_api

    api = ui_to_api(json.loads((CONTROL / f"{name}.json").read_text(encoding="utf-8")), name)
    for node_id, values in {**CASES[name][0], **(overrides or {})}.items():
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    return api


def _run(home: Path, cache: ModelCache, out: Path, api: dict) -> list[Path]:
    """Run ``api`` as the worker does, pickles allowed; the PNGs written."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks

    engine = EngineState(CPU, cache, ModelPaths(home / "models", input_dir=home / "input"), out,
                         out.parent / "tmp", out.parent / "cfg", allow_pickle=True)
    Executor(engine).run(api, Hooks(), lambda: False)
    return sorted(out.rglob("*.png"))


def _image(home: Path, cache: ModelCache, out: Path, api: dict) -> np.ndarray:
    (saved,) = _run(home, cache, out, api)
    with Image.open(saved) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", list(CASES))
def test_template_imports_validates_and_runs(home: Path, cache: ModelCache, tmp_path: Path, name: str) -> None:
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    api = _api(name)
    paths = ModelPaths(home / "models", input_dir=home / "input")
    assert not validate_workflow(Workflow.from_data(api), paths, allow_pickle=True)
    saved = _run(home, cache, tmp_path / "out", api)
    sizes = CASES[name][1]
    assert len(saved) == len(sizes)
    # named as ComfyUI names them: the SaveImage prefix (gligen's has a sub-folder), a counter
    prefixes = {n["inputs"]["filename_prefix"] for n in api.values() if n["class_type"] == "SaveImage"}
    assert {p.relative_to(tmp_path / "out").as_posix().rsplit("_", 2)[0] for p in saved} == prefixes
    assert sorted(check_saved(saved, api)) == sorted(sizes)


def test_pickle_files_are_refused_without_allow_pickle(home: Path) -> None:
    """The .pth adapter and the .ckpt VAE stop at validation, naming the loader's input and the flag."""
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    paths = ModelPaths(home / "models", input_dir=home / "input")
    issues = validate_workflow(Workflow.from_data(_api("depth_t2i_adapter")), paths)
    assert sorted((i.node_id, i.input) for i in issues) == [("31", "control_net_name"), ("33", "ckpt_name")]
    assert all("--allow-pickle" in i.message for i in issues)
    issues = validate_workflow(Workflow.from_data(_api("mixing_controlnets")), paths)
    assert [(i.node_id, i.input) for i in issues] == [("15", "vae_name")]


@pytest.mark.parametrize(("name", "apply"), [("controlnet_example", "10"), ("depth_controlnet", "23"),
                                             ("depth_t2i_adapter", "23"), ("2_pass_pose_worship", "10")])
def test_the_control_changes_the_image(home: Path, cache: ModelCache, tmp_path: Path, name: str, apply: str) -> None:
    """At the template's strength the ControlNet (or adapter) changes the image; at strength 0 (ControlNetApply
    returns the conditioning as it is) the same seed gives the image without it."""
    with_control = _run(home, cache, tmp_path / "with", _api(name))
    without = _run(home, cache, tmp_path / "without", _api(name, {apply: {"strength": 0.0}}))
    assert len(with_control) == len(without) == len(CASES[name][1])
    images = {}
    for file in with_control + without:
        with Image.open(file) as png:
            images.setdefault(png.size, []).append(np.asarray(png.convert("RGB"), dtype=np.int16))
    for size, (a, b) in images.items():  # each pass's image (2_pass_pose_worship: both passes)
        assert np.abs(a - b).max() > 8, (name, size)


def test_mixing_controlnets_applies_both(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """Both ControlNets of the chain count: turning either off changes the image."""
    both = _image(home, cache, tmp_path / "both", _api("mixing_controlnets"))
    no_pose = _image(home, cache, tmp_path / "no-pose", _api("mixing_controlnets", {"22": {"strength": 0.0}}))
    no_scribble = _image(home, cache, tmp_path / "no-scribble",
                         _api("mixing_controlnets", {"23": {"strength": 0.0}}))
    assert np.abs(both - no_pose).max() > 8 and np.abs(both - no_scribble).max() > 8
    assert np.abs(no_pose - no_scribble).max() > 8


def test_diff_controlnet_is_the_whole_controlnet(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """kohya's difference file plus the template's model is the ControlNet it was made from: the template's image
    is (to fp16 rounding of the stored difference) the one the whole ControlNet gives through ControlNetLoader."""
    diff = _image(home, cache, tmp_path / "diff", _api("depth_controlnet"))
    api = _api("depth_controlnet")
    api["33"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "depth-whole.safetensors"}}
    whole = _image(home, cache, tmp_path / "whole", api)
    none = _image(home, cache, tmp_path / "none", _api("depth_controlnet", {"23": {"strength": 0.0}}))
    assert np.abs(diff - whole).max() <= 2
    assert np.abs(diff - none).max() > 8


def test_gligen_boxes_change_the_image(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """The GLIGEN text boxes change the image against the same prompt without them (KSampler fed the prompt)."""
    boxed = _image(home, cache, tmp_path / "boxed", _api("gligen_textbox_example"))
    api = _api("gligen_textbox_example")
    api["3"]["inputs"]["positive"] = ["24", 0]
    for node_id in ("27", "21", "10"):
        del api[node_id]
    plain = _image(home, cache, tmp_path / "plain", api)
    assert np.abs(boxed - plain).max() > 8


def test_pickle_vae_loads_as_its_safetensors_twin(home: Path, tmp_path: Path) -> None:
    """A .ckpt VAE (the anime VAE two templates name; ``state_dict`` holding the original keys) loads, with pickles
    allowed, to the weights of the same VAE as a .safetensors file; without, the error names the flag; and the
    vae folder lists it, as ComfyUI's does."""
    from tui_diffusion.modelfiles.header import CheckpointError
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.checkpoint_writer_lotus import write_sd_vae
    from tui_diffusion.pipeline.models import load_vae

    pickled = home / "models" / "vae" / "kl-f8-anime2.ckpt"
    twin = write_sd_vae(tmp_path / "twin.safetensors", seed=2)
    ours = load_vae(pickled, CPU, tmp_path / "cfg", allow_pickle=True).vae.state_dict()
    theirs = load_vae(twin, CPU, tmp_path / "cfg").vae.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_vae(pickled, CPU, tmp_path / "cfg")
    assert "kl-f8-anime2.ckpt" in ModelPaths(home / "models").list("vae")

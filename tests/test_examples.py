"""ComfyUI's own example workflows (``comfyanonymous/ComfyUI_examples``, copied unchanged into
``tests/data/examples/``) for the SD1.x, SD2.x and Flux.1 families import from ComfyUI's UI format, validate with
nothing missing and run on tiny random-weight files of the right architectures placed under the file names they
expect (issue 16, "Done when"). The two ``.ckpt`` files they name are written as pickles in the original layout and
run with pickles allowed, as a user would pass ``--allow-pickle``. Sizes and steps are made small with the overrides
``tui-diffusion run --set`` applies; nothing else in the workflows is changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, TINY_SD2_V
from tests.dit_helpers import CPU, shared_models

EXAMPLES = Path(__file__).parent / "data" / "examples"

#: example -> the inputs set small (node id -> values), as ``--set`` would; and the saved images' (width, height)
#: (one size, or a list of sizes, one per SaveImage, in any order)
CASES: dict[str, tuple[dict[str, dict], tuple[int, int] | list[tuple[int, int]]]] = {
    # SD1.5 img2img at denoise 1: the output has the input image's size
    "img2img_img2img_workflow": ({"16": {"steps": 2}}, (64, 48)),
    # SD2 inpainting (9 input channels) from a .ckpt, VAEEncodeForInpaint, uni_pc_bh2
    "inpaint_inpaint": ({"3": {"steps": 2}}, (64, 64)),
    # SD2.1 768 v-prediction (4 input channels) with VAEEncodeForInpaint: the noise mask does the inpainting
    "inpaint_inpaint_example": ({"25": {"steps": 2}}, (64, 64)),
    # SD2.1 unCLIP from a .ckpt: two image embeddings through chained unCLIPConditioning, uni_pc_bh2
    "unclip_unclip_workflow": ({"5": {"width": 64, "height": 48}, "3": {"steps": 2}}, (64, 48)),
    # Flux dev from separate files, OptimalStepsScheduler's sigmas (its fewest steps: 3); the PrimitiveNodes that
    # held width and height are folded into the two nodes they fed
    "flux_flux_dev_OptimalSteps": ({"27": {"width": 64, "height": 48}, "30": {"width": 64, "height": 48},
                                    "39": {"steps": 3}}, (64, 48)),
    # hires fix (2 pass txt2img) on SD2.1 768 v from a .ckpt: dpmpp_sde, LatentUpscale, a second KSampler at denoise
    # 0.5 with dpmpp_2m; the first pass's image is saved too
    "png_2_pass_txt2img": ({"5": {"width": 64, "height": 48}, "10": {"width": 96, "height": 72},
                            "3": {"steps": 2}, "11": {"steps": 2}}, [(64, 48), (96, 72)]),
    # area composition (SD1 .ckpt + a second SD1 checkpoint, a separate VAE, CLIPSetLastLayer -2): four
    # ConditioningSetArea bands combined with the whole-image prompt, then a latent upscale and a second pass; sizes
    # and positions divided by 8, the bands' heights raised to the node's minimum (64)
    "png_area_composition": ({"5": {"width": 88, "height": 160}, "34": {"width": 88, "height": 64, "y": 0},
                              "18": {"width": 88, "height": 64, "y": 40}, "11": {"width": 88, "height": 64, "y": 64},
                              "15": {"width": 88, "height": 64, "y": 88}, "22": {"width": 96, "height": 176},
                              "3": {"steps": 2}, "24": {"steps": 2}}, [(88, 160), (96, 176)]),
    # SD1.5 with a kohya LoRA on the UNet and the text encoder (LoraLoader at strengths 1, 1)
    "png_lora": ({"5": {"width": 64, "height": 48}, "3": {"steps": 2}}, (64, 48)),
}


def _as_ckpt(safetensors_file: Path, ckpt: Path) -> None:
    """A pickle checkpoint as the original ``.ckpt`` files hold one: the weights under ``state_dict``."""
    from safetensors.torch import load_file

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": load_file(str(safetensors_file)), "global_step": 1}, ckpt)
    safetensors_file.unlink()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A models folder and an input folder holding what the examples name."""
    from tui_diffusion.pipeline.checkpoint_writer import (
        TinySD1,
        TinySD2,
        build_sd1_models,
        write_kohya_lora,
        write_sd2_checkpoint,
    )
    from tui_diffusion.pipeline.checkpoint_writer_lotus import write_sd_vae
    from tui_diffusion.pipeline.checkpoint_writer_vision import write_sd21_unclip_checkpoint

    root = Path(tmp_path_factory.mktemp("examples"))
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "v1-5-pruned-emaonly-fp16.safetensors").symlink_to(models_dir / "checkpoints" / TINY)
    (checkpoints / "STableDiffusionv2-1_768-ema-pruned.safetensors").symlink_to(
        models_dir / "checkpoints" / TINY_SD2_V)
    work = root / "work"
    _as_ckpt(write_sd2_checkpoint(work / "inpainting.safetensors", TinySD2(in_channels=9), seed=5),
             checkpoints / "512-inpainting-ema.ckpt")
    _as_ckpt(write_sd21_unclip_checkpoint(work / "unclip.safetensors", seed=6), checkpoints / "sd21-unclip-h.ckpt")
    work.mkdir(exist_ok=True)
    sd21_v = work / "sd21_v.safetensors"
    sd21_v.write_bytes((models_dir / "checkpoints" / TINY_SD2_V).read_bytes())
    _as_ckpt(sd21_v, checkpoints / "v2-1_768-ema-pruned.ckpt")
    sd1 = work / "sd1.safetensors"
    sd1.write_bytes((models_dir / "checkpoints" / TINY).read_bytes())
    _as_ckpt(sd1, checkpoints / "Anything-V3.0.ckpt")
    (checkpoints / "AbyssOrangeMix2_hard.safetensors").symlink_to(models_dir / "checkpoints" / TINY)
    write_sd_vae(root / "models" / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    unet, _, text = build_sd1_models(TinySD1(), seed=0)  # the architecture of the tiny SD1.5 checkpoint
    write_kohya_lora(root / "models" / "loras" / "epiNoiseoffset_v2.safetensors", unet, [text], seed=3)
    dit = shared_models(tmp_path_factory)
    for kind, names in (("diffusion_models", ("flux1-dev.safetensors",)), ("vae", ("ae.safetensors",)),
                        ("text_encoders", ("t5xxl_fp16.safetensors", "clip_l.safetensors"))):
        (root / "models" / kind).mkdir(exist_ok=True)
        for name in names:
            (root / "models" / kind / name).symlink_to(dit / kind / name)
    rng = np.random.default_rng(0)
    (root / "input").mkdir()
    for name, (height, width) in (("example.png", (48, 64)), ("sunset.png", (40, 56)),
                                  ("mountains.png", (56, 40))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "input" / name)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:40, 8:48, 3] = 0  # the area to inpaint (LoadImage's mask is 1 - alpha)
    Image.fromarray(rgba).save(root / "input" / "yosemite_inpaint_example.png")
    return root


def check_saved(saved: list[Path], api: dict) -> list[tuple[int, int]]:
    """Each PNG written is a picture (not one flat colour) that holds the workflow it came from: the API prompt as
    run and a UI workflow that converts back to it. Their (width, height), in the order given."""
    from tui_diffusion.graph.ui_format import ui_to_api

    found = []
    for file in saved:
        with Image.open(file) as png:
            found.append(png.size)
            image = np.asarray(png.convert("RGB"))
            text = dict(png.text)  # type: ignore[attr-defined]
        assert image.std() > 0, file.name
        assert json.loads(text["prompt"]) == api, file.name
        embedded = ui_to_api(json.loads(text["workflow"]), "embedded")
        assert {k: (v["class_type"], v["inputs"]) for k, v in embedded.items()} == \
            {k: (v["class_type"], v["inputs"]) for k, v in api.items()}, file.name
    return found


def _api(name: str) -> dict:
    from tui_diffusion.graph.ui_format import ui_to_api

    return ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8")), name)


@pytest.mark.parametrize("name", list(CASES))
def test_example_imports_validates_and_runs(home: Path, tmp_path: Path, name: str) -> None:
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    overrides, size = CASES[name]
    api = _api(name)
    for node_id, values in overrides.items():
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    paths = ModelPaths(home / "models", input_dir=home / "input")
    assert not validate_workflow(Workflow.from_data(api), paths, allow_pickle=True)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg",
                         allow_pickle=True)
    Executor(engine).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    sizes = size if isinstance(size, list) else [size]
    assert len(saved) == len(sizes)
    assert sorted(check_saved(saved, api)) == sorted(sizes)


def test_pickle_examples_are_refused_without_allow_pickle(home: Path) -> None:
    """The .ckpt examples stop at validation, naming the loader's input and the flag, unless pickles are allowed."""
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    paths = ModelPaths(home / "models", input_dir=home / "input")
    for name, loader in (("inpaint_inpaint", "4"), ("unclip_unclip_workflow", "14")):
        issues = validate_workflow(Workflow.from_data(_api(name)), paths)
        assert [(i.node_id, i.input) for i in issues] == [(loader, "ckpt_name")]
        assert "--allow-pickle" in issues[0].message


def test_the_files_placed_are_the_architectures_the_examples_are_for(home: Path, tmp_path: Path) -> None:
    """So that each run above exercises the model it stands for: SD2's inpainting UNet from the pickle, the
    v-prediction SD2.1, the (v-prediction) unCLIP model."""
    from tui_diffusion.pipeline.models import load_checkpoint

    expected = {"v1-5-pruned-emaonly-fp16.safetensors": ("sd1", "eps"),
                "512-inpainting-ema.ckpt": ("sd2-inpaint", "eps"),
                "STableDiffusionv2-1_768-ema-pruned.safetensors": ("sd2", "v"),
                "sd21-unclip-h.ckpt": ("sd2-unclip", "v"),
                "v2-1_768-ema-pruned.ckpt": ("sd2", "v")}
    for name, (family, prediction) in expected.items():
        model = load_checkpoint(home / "models" / "checkpoints" / name, CPU, tmp_path / "cfg", True).model
        assert (model.family.id, model.model_sampling.prediction) == (family, prediction), name
    inpaint = load_checkpoint(home / "models" / "checkpoints" / "512-inpainting-ema.ckpt", CPU, tmp_path / "cfg",
                              True).model
    assert inpaint.unet.config.in_channels == 9


#: OptimalStepsScheduler's FLUX levels (ComfyUI's ``nodes_optimalsteps``), 10 steps
FLUX_LEVELS = [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001]


def _stretched(levels: list[float], count: int) -> list[float]:
    """The levels resampled to ``count`` by interpolating log-sigma linearly in position (written out by hand)."""
    out = []
    for i in range(count):
        pos = i * (len(levels) - 1) / (count - 1)
        lo = min(int(pos), len(levels) - 2)
        frac = pos - lo
        out.append(float(np.exp((1 - frac) * np.log(levels[lo]) + frac * np.log(levels[lo + 1]))))
    return out


@pytest.mark.parametrize(("model_type", "steps", "denoise"),
                         [("FLUX", 10, 1.0), ("FLUX", 3, 1.0), ("FLUX", 25, 1.0), ("FLUX", 10, 0.5),
                          ("Wan", 8, 0.75), ("Chroma", 40, 1.0), ("Chroma", 12, 1.0)])
def test_optimal_steps_scheduler_gives_comfyuis_sigmas(model_type: str, steps: int, denoise: float) -> None:
    from tui_diffusion.pipeline.registry import implementations
    from tui_diffusion.pipeline.schedules import OPTIMAL_STEPS_LEVELS

    levels = list(OPTIMAL_STEPS_LEVELS[model_type])
    full = levels if steps + 1 == len(levels) else _stretched(levels, steps + 1)
    kept = steps if denoise >= 1.0 else round(steps * denoise)
    expected = torch.tensor(full[-(kept + 1):-1] + [0.0])
    (sigmas,) = implementations()["OptimalStepsScheduler"](None, model_type=model_type, steps=steps,
                                                           denoise=denoise).outputs
    assert sigmas.dtype == torch.float32 and sigmas.shape == (kept + 1,)
    torch.testing.assert_close(sigmas, expected, rtol=1e-6, atol=1e-7)
    if model_type == "FLUX" and steps == 10:  # the table itself, untouched when it has steps + 1 levels
        assert sigmas.tolist() == pytest.approx((FLUX_LEVELS[:-1] + [0.0])[-(kept + 1):])


def test_optimal_steps_scheduler_spec_and_edges() -> None:
    from tui_diffusion.graph.specs import NODE_SPECS
    from tui_diffusion.graph.validate import comfy_core_nodes
    from tui_diffusion.pipeline.registry import implementations

    spec = NODE_SPECS["OptimalStepsScheduler"]
    inputs = {i.name: i for i in spec.inputs}
    assert inputs["model_type"].choices == ("FLUX", "Wan", "Chroma") and inputs["model_type"].default == "FLUX"
    assert (inputs["steps"].default, inputs["steps"].min, inputs["steps"].max) == (20, 3, 1000)
    assert (inputs["denoise"].default, inputs["denoise"].min, inputs["denoise"].max) == (1.0, 0.0, 1.0)
    assert [o.type for o in spec.outputs] == ["SIGMAS"] and "OptimalStepsScheduler" in comfy_core_nodes()
    run = implementations()["OptimalStepsScheduler"]
    assert run(None, model_type="FLUX", steps=10, denoise=0.0).outputs[0].numel() == 0
    assert run(None, model_type="FLUX", steps=3, denoise=0.1).outputs[0].tolist() == [0.0]  # round(0.3) steps


def test_lora_example_applies_its_lora(home: Path, tmp_path: Path) -> None:
    """The lora example's image changes with the LoRA's strengths (same seed), so the LoRA file is really applied."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    images = []
    for strength in (1.0, 0.0):
        api = _api("png_lora")
        api["5"]["inputs"].update(width=64, height=48)
        api["3"]["inputs"].update(steps=2)
        api["10"]["inputs"].update(strength_model=strength, strength_clip=strength)
        out = tmp_path / f"out{strength}"
        engine = EngineState(CPU, ModelCache(2), ModelPaths(home / "models", input_dir=home / "input"), out,
                             tmp_path / "tmp", tmp_path / "cfg")
        Executor(engine).run(api, Hooks(), lambda: False)
        (saved,) = out.glob("*.png")
        with Image.open(saved) as png:
            images.append(np.asarray(png.convert("RGB"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() > 0

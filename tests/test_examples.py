"""ComfyUI's own example workflows (``comfyanonymous/ComfyUI_examples``, copied unchanged into
``tests/data/examples/``) for the SD1.x, SD2.x and Flux.1 families import from ComfyUI's UI format, validate with
nothing missing and run on tiny random-weight files of the right architectures placed under the file names they
expect (issue 16, "Done when"). The two ``.ckpt`` files they name are written as pickles in the original layout and
run with pickles allowed, as a user would pass ``--allow-pickle``. Sizes and steps are made small with the overrides
``tui-diffusion run --set`` applies; nothing else in the workflows is changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, TINY_SD2_V, TINY_XL
from tests.dit_helpers import CPU, shared_models
from tui_diffusion.pipeline.executor import Executor

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


# -- Rebuilt from the published pages ------------------------------------------------------------------------------
# Five ComfyUI_examples pages publish their workflows only inside PNGs; ``rebuilt_*.json`` are rebuilt from the
# pages' text and the details recovered (tests/data/examples/README.md says what is known and what is guessed).

#: rebuilt example -> the inputs set small, and the saved images' (width, height), as in CASES
REBUILT_CASES: dict[str, tuple[dict[str, dict], tuple[int, int] | list[tuple[int, int]]]] = {
    # SD1.5 (.ckpt) + an A1111 hypernetwork (.pt), uni_pc_bh2
    "rebuilt_hypernetwork_example": ({"12": {"width": 64, "height": 48}, "13": {"steps": 2}}, (64, 48)),
    # two SD1 checkpoints through ModelMergeSimple 0.5, a pickle VAE; the CheckpointSave is muted
    "rebuilt_model_merging_basic": ({"12": {"width": 64, "height": 48}, "13": {"steps": 2}}, (64, 48)),
    # three SD1 checkpoints through two ModelMergeBlocks
    "rebuilt_model_merging_3_checkpoints": ({"12": {"width": 64, "height": 48}, "13": {"steps": 2}}, (64, 48)),
    # a LoRA baked into the checkpoint to save
    "rebuilt_model_merging_lora": ({"12": {"width": 64, "height": 48}, "13": {"steps": 2}}, (64, 48)),
    # add difference: (SD1 inpainting - SD1.5) * 1 + another SD1, sampled as an inpainting model
    "rebuilt_model_merging_inpaint": ({"13": {"steps": 2}}, (64, 64)),
    # CosXL from (an SDXL model - SDXL base) + CosXL base
    "rebuilt_model_merging_cosxl": ({"12": {"width": 64, "height": 64}, "13": {"steps": 2}}, (64, 64)),
    # SDXL + the LCM LoRA, ModelSamplingDiscrete lcm, the lcm sampler on sgm_uniform
    "rebuilt_lcm_basic_example": ({"12": {"width": 64, "height": 64}, "13": {"steps": 2}}, (64, 64)),
    # CosXL edit (SDXL InstructPix2Pix, 8 input channels) on mountains.png
    "rebuilt_sdxl_edit_model": ({"13": {"steps": 2}}, (40, 56)),
    # noisy latent composition: a background and three subjects sampled 1 of 4 steps with leftover noise,
    # composited with feathering, the rest sampled on the composite; then the optional second pass (sizes / 8)
    "rebuilt_noisy_latents_3_subjects": (
        {"11": {"width": 160, "height": 88}, **{n: {"width": 32, "height": 64} for n in ("21", "31", "41")},
         **{n: {"steps": 4, "end_at_step": 1} for n in ("12", "22", "32", "42")},
         "50": {"x": 32, "y": 24, "feather": 8}, "51": {"x": 64, "y": 24, "feather": 8},
         "52": {"x": 96, "y": 24, "feather": 8}, "61": {"steps": 4, "start_at_step": 1},
         "70": {"width": 240, "height": 136}, "71": {"steps": 2}},
        [(160, 88), (240, 136)]),
}


def write_cosxl(path: Path, seed: int, in_channels: int = 4) -> Path:
    """A tiny SDXL checkpoint as Stability's CosXL files are: ``edm_vpred.sigma_max/min`` beside the weights (EDM
    v-prediction), and for the edit model a UNet reading 8 channels (the noisy latent and the input image's)."""
    from safetensors.torch import save_file

    from tui_diffusion.pipeline.checkpoint_writer import TinySDXL, build_sdxl_models, sdxl_state_dict

    unet, vae, text, text_2 = build_sdxl_models(TinySDXL(), seed)
    state = sdxl_state_dict(unet, vae, text, text_2, TinySDXL().layers_per_block)
    if in_channels != 4:
        conv = state["model.diffusion_model.input_blocks.0.0.weight"]
        extra = torch.randn(conv.shape[0], in_channels - conv.shape[1], *conv.shape[2:],
                            generator=torch.Generator().manual_seed(seed)) * conv.std()
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv, extra], dim=1)
    state["edm_vpred.sigma_max"] = torch.tensor([120.0])
    state["edm_vpred.sigma_min"] = torch.tensor([0.002])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def rebuilt_home(home: Path, models_dir: Path) -> Path:
    """``home`` with the files the rebuilt examples name: distinct tiny SD1/SDXL checkpoints (pickles where the
    names are .ckpt), SD1's inpainting variant, a CosXL base (EDM keys) and a CosXL edit model (8 input
    channels), a pickle VAE, an A1111 hypernetwork and the SDXL LCM LoRA (UNet layers only)."""
    from tui_diffusion.pipeline.checkpoint_writer import (
        TinySD1,
        TinySDXL,
        build_sdxl_models,
        write_kohya_lora,
        write_sd1_checkpoint,
        write_sdxl_checkpoint,
    )
    from tui_diffusion.pipeline.checkpoint_writer_gligen import hypernetwork_dict, write_hypernetwork
    from tui_diffusion.pipeline.checkpoint_writer_lotus import write_sd_vae

    models = home / "models"
    checkpoints = models / "checkpoints"
    work = home / "rebuilt-work"
    work.mkdir()
    _as_ckpt(write_sd1_checkpoint(work / "v15.safetensors", seed=0), checkpoints / "v1-5-pruned-emaonly.ckpt")
    write_sd1_checkpoint(checkpoints / "cardosAnime_v10.safetensors", seed=11)
    _as_ckpt(write_sd1_checkpoint(work / "inpainting.safetensors", TinySD1(in_channels=9), seed=12),
             checkpoints / "sd-v1-5-inpainting.ckpt")
    _as_ckpt(write_sd_vae(work / "anime-vae.safetensors", seed=2), models / "vae" / "kl-f8-anime2.ckpt")
    write_hypernetwork(models / "hypernetworks" / "dantionMarbleStatues_10.pt",
                       hypernetwork_dict((32, 64), seed=4, activation_func="relu", is_layer_norm=True))
    for name in ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors"):
        (checkpoints / name).symlink_to(models_dir / "checkpoints" / TINY_XL)
    write_sdxl_checkpoint(checkpoints / "albedobaseXL_v21.safetensors", seed=13)
    write_cosxl(checkpoints / "cosxl.safetensors", seed=14)
    write_cosxl(checkpoints / "cosxl_edit.safetensors", seed=15, in_channels=8)
    unet, _, _, _ = build_sdxl_models(TinySDXL(), seed=0)  # the architecture of the tiny SDXL checkpoint
    write_kohya_lora(models / "loras" / "lcm_lora_sdxl.safetensors", unet, [], seed=16, original_names=True)
    return home


def _rebuilt_api(name: str, unmute: tuple[int, ...] = ()) -> dict:
    """The rebuilt example in the API format with its REBUILT_CASES inputs set (and the ``unmute`` nodes on, as
    a user unmutes the CheckpointSave once happy with the merge)."""
    from tui_diffusion.graph.ui_format import ui_to_api

    overrides, _ = REBUILT_CASES[name]
    data = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
    for node in data["nodes"]:
        if node["id"] in unmute:
            assert node["mode"] == 2, (name, node["id"])  # muted as published
            node["mode"] = 0
    api = ui_to_api(data, name)
    for node_id, values in overrides.items():
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    return api


#: one model cache per models folder for the runs below, so that each checkpoint is read once (tiny as they are,
#: the pickles take a while to load)
_MODEL_CACHES: dict[Path, Any] = {}


def _run(home: Path, out: Path, api: dict) -> tuple[list[np.ndarray], Executor]:
    """Runs ``api`` with pickles allowed; the images saved (sorted by name) and the executor (its node cache)."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    models = _MODEL_CACHES.setdefault(home, ModelCache(16))
    engine = EngineState(CPU, models, ModelPaths(home / "models", input_dir=home / "input"), out / "out",
                         out / "tmp", out / "cfg", allow_pickle=True)
    executor = Executor(engine)
    executor.run(api, Hooks(), lambda: False)
    images = []
    for file in sorted((out / "out").glob("*.png")):
        with Image.open(file) as png:
            images.append(np.asarray(png.convert("RGB"), dtype=np.int16))
    return images, executor


@pytest.mark.parametrize("name", list(REBUILT_CASES))
def test_rebuilt_example_imports_validates_and_runs(rebuilt_home: Path, tmp_path: Path, name: str) -> None:
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    api = _rebuilt_api(name)
    paths = ModelPaths(rebuilt_home / "models", input_dir=rebuilt_home / "input")
    assert not validate_workflow(Workflow.from_data(api), paths, allow_pickle=True)
    _run(rebuilt_home, tmp_path, api)
    saved = sorted((tmp_path / "out").glob("*.png"))
    size = REBUILT_CASES[name][1]
    sizes = size if isinstance(size, list) else [size]
    assert len(saved) == len(sizes)
    assert sorted(check_saved(saved, api)) == sorted(sizes)


def _image(home: Path, out: Path, api: dict) -> np.ndarray:
    (image,) = _run(home, out, api)[0]
    return image


def _saved_checkpoint(out: Path) -> Path:
    (file,) = (out / "out").glob("checkpoints/*.safetensors")
    return file


def test_rebuilt_files_are_the_architectures_they_stand_for(rebuilt_home: Path, tmp_path: Path) -> None:
    """CosXL's files sample as EDM v-prediction over the sigma range they carry (ComfyUI reads
    ``edm_vpred.sigma_max/min``); the edit model reads 8 channels; the inpainting merge's source has 9."""
    from tui_diffusion.pipeline.model_sampling import EDMSampling
    from tui_diffusion.pipeline.models import load_checkpoint

    def load(name: str) -> Any:
        return load_checkpoint(rebuilt_home / "models" / "checkpoints" / name, CPU, tmp_path / "cfg", True).model

    for name, channels in (("cosxl.safetensors", 4), ("cosxl_edit.safetensors", 8)):
        model = load(name)
        sampling = model.model_sampling
        assert model.family.id == "sdxl" and model.unet.config.in_channels == channels, name
        assert isinstance(sampling, EDMSampling) and sampling.prediction == "v", name
        assert (sampling.sigma_min, sampling.sigma_max) == (pytest.approx(0.002), pytest.approx(120.0)), name
    assert load("albedobaseXL_v21.safetensors").model_sampling.prediction == "eps"
    inpaint = load("sd-v1-5-inpainting.ckpt")
    assert (inpaint.family.id, inpaint.unet.config.in_channels) == ("sd1-inpaint", 9)


def test_rebuilt_merge_follows_its_ratio_and_saves_a_loadable_checkpoint(rebuilt_home: Path, tmp_path: Path) -> None:
    """model_merging_basic: ratio 1 is the first model's image and ratio 0 the second's (same seed, prompts and
    VAE); the published 0.5 is neither. Unmuted, its CheckpointSave writes an SD1 file that samples the merge."""
    from tui_diffusion.pipeline.models import load_checkpoint

    name = "rebuilt_model_merging_basic"
    images = {}
    for ratio in (1.0, 0.0, 0.5):
        api = _rebuilt_api(name)
        api["3"]["inputs"]["ratio"] = ratio
        images[ratio] = _image(rebuilt_home, tmp_path / f"r{ratio}", api)
    for source, ratio in (("1", 1.0), ("2", 0.0)):
        api = _rebuilt_api(name)
        api["13"]["inputs"]["model"] = [source, 0]
        assert np.array_equal(_image(rebuilt_home, tmp_path / f"m{source}", api), images[ratio]), source
    assert np.abs(images[0.5] - images[1.0]).max() > 0 and np.abs(images[0.5] - images[0.0]).max() > 0

    _run(rebuilt_home, tmp_path / "save", _rebuilt_api(name, unmute=(5,)))
    saved = _saved_checkpoint(tmp_path / "save")
    assert load_checkpoint(saved, CPU, tmp_path / "cfg", False).model.family.id == "sd1"
    (rebuilt_home / "models" / "checkpoints" / "merged-basic.safetensors").symlink_to(saved)
    api = _rebuilt_api(name)
    api["1"]["inputs"]["ckpt_name"] = "merged-basic.safetensors"
    api["13"]["inputs"]["model"] = ["1", 0]
    assert np.abs(_image(rebuilt_home, tmp_path / "reloaded", api) - images[0.5]).max() <= 2


def test_rebuilt_block_merge_of_three_checkpoints(rebuilt_home: Path, tmp_path: Path) -> None:
    """model_merging_3_checkpoints: with every block ratio 1 both merges keep the first checkpoint; the
    published (guessed) ratios change the image."""
    name = "rebuilt_model_merging_3_checkpoints"
    first = _rebuilt_api(name)
    first["13"]["inputs"]["model"] = ["1", 0]
    ones = _rebuilt_api(name)
    for node in ("4", "5"):
        ones[node]["inputs"].update(input=1.0, middle=1.0, out=1.0)
    merged = _image(rebuilt_home, tmp_path / "merged", _rebuilt_api(name))
    plain = _image(rebuilt_home, tmp_path / "first", first)
    assert np.array_equal(_image(rebuilt_home, tmp_path / "ones", ones), plain)
    assert np.abs(merged - plain).max() > 0


def test_rebuilt_lora_merge_bakes_the_lora_into_the_saved_checkpoint(rebuilt_home: Path, tmp_path: Path) -> None:
    """model_merging_lora: the LoRA changes the image, and the unmuted CheckpointSave's file, loaded without the
    LoRA, samples the image with it."""
    name = "rebuilt_model_merging_lora"
    without = _rebuilt_api(name)
    without["2"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    with_lora = _image(rebuilt_home, tmp_path / "lora", _rebuilt_api(name))
    assert np.abs(with_lora - _image(rebuilt_home, tmp_path / "plain", without)).max() > 0
    _run(rebuilt_home, tmp_path / "save", _rebuilt_api(name, unmute=(3,)))
    (rebuilt_home / "models" / "checkpoints" / "merged-lora.safetensors").symlink_to(_saved_checkpoint(tmp_path /
                                                                                                         "save"))
    baked = _rebuilt_api(name)
    baked["1"]["inputs"]["ckpt_name"] = "merged-lora.safetensors"
    baked["2"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    assert np.abs(_image(rebuilt_home, tmp_path / "baked", baked) - with_lora).max() <= 2


def test_rebuilt_add_difference_makes_an_inpainting_model(rebuilt_home: Path, tmp_path: Path) -> None:
    """model_merging_inpaint: (inpaint - base) * multiplier + other; the multiplier changes the image, and the
    saved result is an SD1 inpainting checkpoint (9 input channels, the inpainting model's own input layer)."""
    from tui_diffusion.pipeline.models import load_checkpoint

    name = "rebuilt_model_merging_inpaint"
    zero = _rebuilt_api(name)
    zero["4"]["inputs"]["multiplier"] = 0.0
    assert np.abs(_image(rebuilt_home, tmp_path / "one", _rebuilt_api(name)) -
                  _image(rebuilt_home, tmp_path / "zero", zero)).max() > 0
    _run(rebuilt_home, tmp_path / "save", _rebuilt_api(name, unmute=(6,)))
    model = load_checkpoint(_saved_checkpoint(tmp_path / "save"), CPU, tmp_path / "cfg", False).model
    source = load_checkpoint(rebuilt_home / "models" / "checkpoints" / "sd-v1-5-inpainting.ckpt", CPU,
                             tmp_path / "cfg", True).model
    assert (model.family.id, model.unet.config.in_channels) == ("sd1-inpaint", 9)
    torch.testing.assert_close(model.unet.conv_in.weight, source.unet.conv_in.weight)


def test_rebuilt_cosxl_merge_keeps_cosxls_sampling(rebuilt_home: Path, tmp_path: Path) -> None:
    """model_merging_cosxl: CosXL base + (an SDXL model - SDXL base); the difference changes the image, and the
    saved model keeps CosXL's EDM v-prediction (``edm_vpred.*`` written, as ComfyUI writes them)."""
    from safetensors import safe_open

    from tui_diffusion.pipeline.model_sampling import EDMSampling
    from tui_diffusion.pipeline.models import load_checkpoint

    name = "rebuilt_model_merging_cosxl"
    zero = _rebuilt_api(name)
    zero["4"]["inputs"]["multiplier"] = 0.0
    plain = _rebuilt_api(name)
    plain["13"]["inputs"]["model"] = ["1", 0]
    merged = _image(rebuilt_home, tmp_path / "merged", _rebuilt_api(name))
    assert np.abs(merged - _image(rebuilt_home, tmp_path / "plain", plain)).max() > 0
    _run(rebuilt_home, tmp_path / "save", _rebuilt_api(name, unmute=(6,)))
    saved = _saved_checkpoint(tmp_path / "save")
    with safe_open(str(saved), "pt") as f:
        assert float(f.get_tensor("edm_vpred.sigma_max")) == pytest.approx(120.0)
    sampling = load_checkpoint(saved, CPU, tmp_path / "cfg", False).model.model_sampling
    assert isinstance(sampling, EDMSampling) and sampling.prediction == "v"


def test_rebuilt_hypernetwork_changes_the_image(rebuilt_home: Path, tmp_path: Path) -> None:
    name = "rebuilt_hypernetwork_example"
    without = _rebuilt_api(name)
    without["13"]["inputs"]["model"] = ["1", 0]
    assert np.abs(_image(rebuilt_home, tmp_path / "hn", _rebuilt_api(name)) -
                  _image(rebuilt_home, tmp_path / "plain", without)).max() > 0


def test_rebuilt_lcm_sampling_differs_from_eps(rebuilt_home: Path, tmp_path: Path) -> None:
    """The LCM example's ModelSamplingDiscrete lcm (LCM's schedule and x0) gives another image than eps."""
    name = "rebuilt_lcm_basic_example"
    eps = _rebuilt_api(name)
    eps["3"]["inputs"]["sampling"] = "eps"
    assert np.abs(_image(rebuilt_home, tmp_path / "lcm", _rebuilt_api(name)) -
                  _image(rebuilt_home, tmp_path / "eps", eps)).max() > 0


def test_lcm_model_sampling_is_comfyuis() -> None:
    """ComfyUI's ModelSamplingDiscreteDistilled + LCM, written out by hand: 50 of the 1000 sigmas (every 20th,
    ending at the last), timestep = 20 * index + 19, x0 = c_out * (x - sigma * eps) + c_skip * x."""
    from tui_diffusion.pipeline.model_sampling import DiscreteSampling, LCMSampling

    full, lcm = DiscreteSampling("eps"), LCMSampling()
    assert lcm.sigmas.shape == (50,)
    torch.testing.assert_close(lcm.sigmas, full.sigmas[19::20])
    assert lcm.timestep(lcm.sigmas[7]).item() == 7 * 20 + 19
    torch.testing.assert_close(lcm.sigma(torch.tensor(7 * 20 + 19.0)), lcm.sigmas[7])
    sigma = lcm.sigmas[10:11]
    x, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = 10 * 20 + 19
    c_skip = 0.25 / ((t * 10.0) ** 2 + 0.25)
    c_out = t * 10.0 / ((t * 10.0) ** 2 + 0.25) ** 0.5
    torch.testing.assert_close(lcm.calculate_denoised(sigma, eps, x), c_out * (x - eps * sigma) + c_skip * x)


def test_rebuilt_edit_model_conditions_on_the_input_image(rebuilt_home: Path, tmp_path: Path) -> None:
    """The CosXL edit example's image follows the input image (same seed and prompts, another picture)."""
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (56, 40, 3), dtype=np.uint8)).save(rebuilt_home / "input" / "other.png")
    other = _rebuilt_api("rebuilt_sdxl_edit_model")
    other["2"]["inputs"]["image"] = "other.png"
    assert np.abs(_image(rebuilt_home, tmp_path / "mountains", _rebuilt_api("rebuilt_sdxl_edit_model")) -
                  _image(rebuilt_home, tmp_path / "other", other)).max() > 0


def test_ip2p_image_is_scaled_only_for_cosxl() -> None:
    """ComfyUI's ``process_ip2p_image_in``: diffusers' InstructPix2Pix models read the VAE's latent as it is,
    CosXL's EDM edit model reads it scaled into SDXL's latent space."""
    from types import SimpleNamespace

    from tui_diffusion.families.sdxl import SDXL

    image = torch.randn(1, 4, 3, 5)
    plain = SimpleNamespace(scheduler_config={})
    cosxl = SimpleNamespace(scheduler_config={"edm_vpred": [0.002, 120.0]})
    torch.testing.assert_close(SDXL.ip2p_image(plain, image, 2, (2, 4, 3, 5)), image.repeat(2, 1, 1, 1))
    torch.testing.assert_close(SDXL.ip2p_image(cosxl, image, 1, (1, 4, 3, 5)), image * 0.13025)
    assert SDXL.ip2p_image(plain, image, 1, (1, 4, 6, 10)).shape == (1, 4, 6, 10)


def test_rebuilt_noisy_latent_composition_pastes_the_subjects(rebuilt_home: Path, tmp_path: Path) -> None:
    """The three subjects' noisy latents (after their first step) are pasted onto the noisy background where
    the LatentComposite nodes say: inside each area the subject, elsewhere the background, untouched."""
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.pipeline.executor import execution_order

    api = _rebuilt_api("rebuilt_noisy_latents_3_subjects")
    _, executor = _run(rebuilt_home, tmp_path, api)
    wf = Workflow.from_data(api, "<job>")
    keys = executor.cache_keys(wf, execution_order(wf))

    def latent(node_id: str) -> torch.Tensor:
        return executor.cache[keys[node_id]].outputs[0]["samples"]

    background, composite = latent("12"), latent("52")
    assert composite.shape == background.shape == (1, 4, 11, 20)
    outside = torch.ones(11, 20, dtype=torch.bool)
    for sampler, x in (("22", 4), ("32", 8), ("42", 12)):  # x, y and sizes in latent pixels (/8)
        subject = latent(sampler)
        torch.testing.assert_close(composite[..., 3:11, x:x + 4], subject)
        assert (subject - background[..., 3:11, x:x + 4]).abs().max() > 0.1
        outside[3:11, x:x + 4] = False
    torch.testing.assert_close(composite[..., outside], background[..., outside])

"""img2img, inpainting, two-stage sampling, conditioning lists, batches and resizing, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY, txt2img
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, execution_order
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


@pytest.fixture()
def engine(models_dir: Path, tmp_path: Path) -> EngineState:
    inputs = tmp_path / "input"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0  # transparent square: the area to inpaint
    Image.fromarray(rgba, "RGBA").save(inputs / "example.png")
    return EngineState(CPU, ModelCache(2), ModelPaths(models_dir, inputs), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def output(ex: Executor, data: dict, node_id: str, index: int = 0):
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))[node_id]].outputs[index]


def run(ex: Executor, data: dict):
    return ex.run(data, Hooks(), lambda: False)


def shipped(name: str, **overrides: object) -> dict:
    data = json.loads((ROOT / "workflows" / name).read_text())
    for target, value in {"4.ckpt_name": TINY, **overrides}.items():
        node_id, key = target.split(".", 1)
        data[node_id]["inputs"][key] = value
    return data


@pytest.mark.parametrize("name", ["img2img.json", "inpaint.json", "hires-fix.json"])
def test_shipped_workflows_run(engine: EngineState, name: str) -> None:
    overrides = {"3.steps": 3}
    if name == "hires-fix.json":
        overrides.update({"5.width": 64, "5.height": 64, "11.steps": 3})
    report = run(Executor(engine), shipped(name, **overrides))
    assert len(report.outputs) == 1 and Path(report.outputs[0]).is_file()
    size = Image.open(report.outputs[0]).size
    assert size == ((96, 96) if name == "hires-fix.json" else (64, 64))


def test_img2img_matches_the_diffusers_img2img_pipeline(engine: EngineState, models_dir: Path,
                                                        tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    data = shipped("img2img.json", **{"3.sampler_name": "euler", "3.scheduler": "simple", "3.steps": 5,
                                      "3.denoise": 0.5, "3.seed": 3, "3.cfg": 6.0})
    ex = Executor(engine)
    run(ex, data)
    ours = output(ex, data, "8")[0].numpy()
    encoded = output(ex, data, "12")["samples"]
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path / "cfg2")
    sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="trailing")
    pipe = StableDiffusionImg2ImgPipeline(vae=loaded.vae.vae, text_encoder=loaded.clip.encoders[0].model,
                                          tokenizer=loaded.clip.encoders[0].tokenizer, unet=loaded.model.unet,
                                          scheduler=sched,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # ComfyUI's denoise 0.5 over 5 steps walks the last 5 of a 10-step schedule: diffusers' strength 0.5 of 10
    # LATENT holds the VAE's own latent; diffusers takes a 4-channel image as latents already scaled
    scaled = loaded.model.family.latent_format.process_in(encoded)
    image = pipe(prompt=data["6"]["inputs"]["text"], negative_prompt=data["7"]["inputs"]["text"], image=scaled,
                 strength=0.5, num_inference_steps=10, guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    np.testing.assert_allclose(ours, image, atol=2e-4)


def test_inpainting_keeps_the_unmasked_latent(engine: EngineState) -> None:
    data = shipped("inpaint.json", **{"3.steps": 4, "3.sampler_name": "euler"})
    ex = Executor(engine)
    run(ex, data)
    encoded = output(ex, data, "12")
    mask = encoded["noise_mask"]
    assert mask.shape == (1, 1, 64, 64) and mask[0, 0, 32, 32] == 1 and mask[0, 0, 2, 2] == 0
    sampled = output(ex, data, "3")["samples"]
    outside = torch.nn.functional.interpolate(mask, size=(8, 8), mode="bilinear") == 0
    outside = outside.expand_as(sampled)
    torch.testing.assert_close(sampled[outside], encoded["samples"][outside], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sampled[~outside], encoded["samples"][~outside], atol=1e-2)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_two_stage_advanced_sampling_equals_one_pass(engine: EngineState, sampler: str) -> None:
    base = txt2img(**{"3.sampler_name": sampler, "3.steps": 6, "3.scheduler": "karras"})
    ex = Executor(engine)
    run(ex, base)
    single = output(ex, base, "3")["samples"]
    two = txt2img()
    common = {"model": ["4", 0], "noise_seed": 1, "steps": 6, "cfg": 8.0, "sampler_name": sampler,
              "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0]}
    two["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 3,
        "return_with_leftover_noise": "enable"}}
    two["10"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "latent_image": ["3", 0], "start_at_step": 3, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    two["8"]["inputs"]["samples"] = ["10", 0]
    run(ex, two)
    staged = output(ex, two, "10")["samples"]
    tol = 2e-2 if sampler == "dpmpp_2m" else 1e-4  # a multistep solver restarts its history at the hand-off
    assert ((staged - single).norm() / single.norm()).item() < tol


def test_conditioning_combine_averages_and_timestep_range_limits(engine: EngineState) -> None:
    ex = Executor(engine)
    plain = txt2img()
    run(ex, plain)
    alone = output(ex, plain, "3")["samples"]
    doubled = txt2img()
    doubled["10"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                     "conditioning_2": ["6", 0]}}
    doubled["3"]["inputs"]["positive"] = ["10", 0]
    run(ex, doubled)
    torch.testing.assert_close(output(ex, doubled, "3")["samples"], alone, rtol=1e-4, atol=1e-4)
    ranged = txt2img()
    ranged["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "something else entirely", "clip": ["4", 1]}}
    ranged["12"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["11", 0],
                                                                             "start": 1.0, "end": 1.0}}
    ranged["10"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                    "conditioning_2": ["12", 0]}}
    ranged["3"]["inputs"]["positive"] = ["10", 0]
    run(ex, ranged)  # the second prompt is never active: the result is the first prompt's
    torch.testing.assert_close(output(ex, ranged, "3")["samples"], alone, rtol=1e-4, atol=1e-4)
    ranged["12"]["inputs"].update(start=0.0, end=0.5)
    run(ex, ranged)
    assert not torch.allclose(output(ex, ranged, "3")["samples"], alone, atol=1e-3)


def test_latent_from_batch_keeps_its_noise(engine: EngineState) -> None:
    ex = Executor(engine)
    batch = txt2img(**{"5.batch_size": 2})
    run(ex, batch)
    both = output(ex, batch, "3")["samples"]
    assert not torch.allclose(both[0], both[1])
    picked = txt2img(**{"5.batch_size": 2})
    picked["10"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": 1, "length": 1}}
    picked["3"]["inputs"]["latent_image"] = ["10", 0]
    run(ex, picked)
    torch.testing.assert_close(output(ex, picked, "3")["samples"][0], both[1], rtol=1e-4, atol=1e-4)
    repeated = txt2img()
    repeated["10"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 3}}
    repeated["3"]["inputs"]["latent_image"] = ["10", 0]
    assert len(run(ex, repeated).outputs) == 3


def test_resizing_nodes(engine: EngineState) -> None:
    ex = Executor(engine)
    data = txt2img()
    data["10"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["5", 0], "upscale_method": "bilinear",
                                                            "width": 128, "height": 0, "crop": "disabled"}}
    data["11"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": "lanczos",
                                                           "scale_by": 0.5}}
    data["12"] = {"class_type": "ImageScale", "inputs": {"image": ["8", 0], "upscale_method": "area",
                                                         "width": 40, "height": 20, "crop": "center"}}
    data["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    data["14"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    data["3"]["inputs"]["latent_image"] = ["10", 0]
    run(ex, data)
    assert output(ex, data, "10")["samples"].shape == (1, 4, 16, 16)
    assert output(ex, data, "11").shape == (1, 64, 64, 3)
    assert output(ex, data, "12").shape == (1, 20, 40, 3)


def test_load_image_gives_the_alpha_as_mask(engine: EngineState) -> None:
    ex = Executor(engine)
    data = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    run(ex, data)
    image, mask = output(ex, data, "1", 0), output(ex, data, "1", 1)
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    assert mask[0, 32, 32] == 1.0 and mask[0, 0, 0] == 0.0
    missing = {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
               "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    with pytest.raises(Exception, match="node 1 'Load Image', input 'image': 'nope.png' not found"):
        run(ex, missing)


def test_inpainting_checkpoint_takes_the_mask_and_masked_image(engine: EngineState, models_dir: Path,
                                                                tmp_path: Path) -> None:
    from tests.conftest import TINY_INPAINT
    from tui_diffusion.modelfiles.describe import describe_checkpoint

    row = describe_checkpoint(models_dir / "checkpoints" / TINY_INPAINT, TINY_INPAINT)
    assert row["family"] == "SD1.x inpainting" and row["supported"]
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_INPAINT, CPU, tmp_path)
    assert loaded.model.unet.config.in_channels == 9
    ex = Executor(engine)
    data = shipped("inpaint.json", **{"4.ckpt_name": TINY_INPAINT, "3.steps": 3})
    assert run(ex, data).outputs
    first = output(ex, data, "3")["samples"]
    # another picture under the same mask: the model sees it through its extra input channels
    Image.new("RGBA", (64, 64), (250, 250, 250, 255)).save(engine.paths.folder("input") / "white.png")
    data["1"]["inputs"]["image"] = "white.png"
    data["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["13", 0], "mask": ["14", 0]}}
    data["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["4", 2]}}
    data["14"] = {"class_type": "LoadImageMask", "inputs": {"image": "example.png", "channel": "alpha"}}
    run(ex, data)
    assert not torch.allclose(output(ex, data, "3")["samples"], first, atol=1e-3)
    txt = txt2img(**{"4.ckpt_name": TINY_INPAINT})  # no mask: the blank image, as ComfyUI does
    assert run(ex, txt).outputs

"""SDXL base: single-file loading, ComfyUI's conditioning, and numerics against diffusers' SDXL pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY_XL
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import TinySDXL, build_sdxl_models
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.sampling import noise_for
from tui_diffusion.pipeline.schedules import ksampler_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


@pytest.fixture()
def engine(models_dir: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def sdxl_workflow(**overrides: object) -> dict:
    data = json.loads((ROOT / "workflows" / "sdxl.json").read_text())
    settings = {"4.ckpt_name": TINY_XL, "5.width": 64, "5.height": 64, "3.steps": 4, "3.seed": 5}
    settings.update(overrides)
    for target, value in settings.items():
        node_id, key = target.split(".", 1)
        data[node_id]["inputs"][key] = value
    return data


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def test_sdxl_file_loads_back_tensor_for_tensor(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_XL, CPU, tmp_path)
    unet, vae, text, text_2 = build_sdxl_models(TinySDXL(), seed=0)
    for ours, theirs in ((unet, loaded.model.unet), (vae, loaded.vae.vae), (text, loaded.clip.encoders[0].model),
                         (text_2, loaded.clip.encoders[1].model)):
        a, b = _state(ours), _state(theirs)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), type(ours).__name__
    assert loaded.model.family.id == "sdxl" and loaded.model.family.latent_format.scale_factor == pytest.approx(0.13025)
    assert loaded.clip.encoders[1].tokenizer.pad_token_id == 0  # OpenCLIP pads with "!"


def test_sdxl_txt2img_matches_the_diffusers_sdxl_pipeline(engine: EngineState, models_dir: Path,
                                                          tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    data = sdxl_workflow(**{"3.scheduler": "simple", "3.steps": 5, "3.cfg": 7.0, "6.text": "a castle on a hill",
                            "7.text": "fog"})
    ex = Executor(engine)
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    ours = ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()

    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_XL, CPU, tmp_path / "cfg2")
    sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="trailing")
    (l_enc, g_enc) = loaded.clip.encoders
    pipe = StableDiffusionXLPipeline(vae=loaded.vae.vae, text_encoder=l_enc.model, text_encoder_2=g_enc.model,
                                     tokenizer=l_enc.tokenizer, tokenizer_2=g_enc.tokenizer, unet=loaded.model.unet,
                                     scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ms = DiscreteSampling.from_scheduler_config(loaded.model.scheduler_config)
    sigmas = ksampler_sigmas(ms, "euler", "simple", 5, 1.0)
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [float(t) for t in ms.timestep(sigmas[:-1])]
    s0 = float(sigmas[0])
    latents = noise_for(5, (1, 4, 8, 8)) * (1 + s0 * s0) ** 0.5 / float(sched.init_noise_sigma)
    image = pipe(prompt="a castle on a hill", negative_prompt="fog", height=64, width=64, num_inference_steps=5,
                 guidance_scale=7.0, latents=latents, output_type="np").images[0]
    np.testing.assert_allclose(ours, image, atol=3e-4)
    assert np.abs(ours - 0.5).mean() > 0.05


def test_sdxl_encode_node_and_size_conditioning(engine: EngineState) -> None:
    ex = Executor(engine)

    def sampled(data: dict) -> torch.Tensor:
        ex.run(data, Hooks(), lambda: False)
        wf = Workflow.from_data(data)
        return ex.cache[ex.cache_keys(wf, execution_order(wf))["3"]].outputs[0]["samples"]

    plain = sampled(sdxl_workflow())
    explicit = sdxl_workflow()
    text = explicit["6"]["inputs"]["text"]
    explicit["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["4", 1], "width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64,
        "target_height": 64, "text_g": text, "text_l": text}}
    # same texts, and the latent's own size: what CLIPTextEncode conditions on by default
    torch.testing.assert_close(sampled(explicit), plain, rtol=1e-4, atol=1e-4)
    explicit["6"]["inputs"]["width"] = 4096  # other size numbers: another image
    assert not torch.allclose(sampled(explicit), plain, atol=1e-3)


def test_sd1_conditioning_into_an_sdxl_model_is_a_clear_error(engine: EngineState) -> None:
    from tests.conftest import txt2img

    data = txt2img()
    data["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_XL}}
    data["3"]["inputs"]["model"] = ["10", 0]
    with pytest.raises(JobError, match="node 3 'KSampler'.*encode the prompts with this checkpoint's CLIP"):
        Executor(engine).run(data, Hooks(), lambda: False)


def test_refiner_file_loads_back_tensor_for_tensor(models_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY_XL_REFINER

    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_XL_REFINER, CPU, tmp_path)
    _, _, _, text_2 = build_sdxl_models(TinySDXL(), seed=0)
    a = _state(text_2)
    b = _state(loaded.clip.encoders[0].model)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.model.family.id == "sdxl-refiner" and len(loaded.clip.encoders) == 1
    assert loaded.model.unet.config.projection_class_embeddings_input_dim == 5 * 8 + 128


def test_base_and_refiner_workflow_runs_and_the_aesthetic_score_matters(engine: EngineState) -> None:
    from tests.conftest import TINY_XL_REFINER

    data = json.loads((ROOT / "workflows" / "sdxl-refiner.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY_XL
    data["12"]["inputs"]["ckpt_name"] = TINY_XL_REFINER
    data["5"]["inputs"].update(width=64, height=64)
    for node_id in ("10", "11"):
        data[node_id]["inputs"]["steps"] = 6
    data["10"]["inputs"]["end_at_step"] = 4
    data["11"]["inputs"]["start_at_step"] = 4
    ex = Executor(engine)
    report = ex.run(data, Hooks(), lambda: False)
    assert len(report.outputs) == 1 and "11" in report.executed
    wf = Workflow.from_data(data)
    first = ex.cache[ex.cache_keys(wf, execution_order(wf))["11"]].outputs[0]["samples"]
    data["15"]["inputs"]["ascore"] = 9.0
    report = ex.run(data, Hooks(), lambda: False)
    assert report.executed[0] == "15" and "10" in report.cached  # the base stage is reused
    wf = Workflow.from_data(data)
    assert not torch.allclose(ex.cache[ex.cache_keys(wf, execution_order(wf))["11"]].outputs[0]["samples"], first)

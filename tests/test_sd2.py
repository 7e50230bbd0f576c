"""SD2.x: OpenCLIP single files, v-prediction detection and override, sampling against diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_SD2, TINY_SD2_V, txt2img
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import TinySD2, build_sd2_models
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, execution_order
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.nodes import encode_text
from tui_diffusion.pipeline.sampling import noise_for
from tui_diffusion.pipeline.schedules import ksampler_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


@pytest.fixture()
def engine(models_dir: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def test_openclip_text_tower_loads_back_tensor_for_tensor(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_SD2, CPU, tmp_path)
    unet, _, text = build_sd2_models(TinySD2(), seed=0)
    for ours, theirs in ((unet, loaded.model.unet), (text, loaded.clip.encoders[0].model)):
        a = {k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
        b = {k.removeprefix("text_model."): v for k, v in theirs.state_dict().items()}
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.model.family.id == "sd2" and loaded.clip.layer == -2  # ComfyUI reads SD2's penultimate layer
    assert loaded.clip.encoders[0].tokenizer.pad_token_id == 0


def test_v_prediction_is_detected(models_dir: Path, tmp_path: Path) -> None:
    eps = load_checkpoint(models_dir / "checkpoints" / TINY_SD2, CPU, tmp_path)
    v = load_checkpoint(models_dir / "checkpoints" / TINY_SD2_V, CPU, tmp_path)
    assert eps.model.scheduler_config["prediction_type"] == "epsilon"
    assert v.model.scheduler_config["prediction_type"] == "v_prediction"


def test_v_prediction_sampling_matches_diffusers(engine: EngineState, models_dir: Path, tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    data = txt2img(**{"4.ckpt_name": TINY_SD2_V, "3.scheduler": "simple", "3.steps": 5, "3.cfg": 5.0,
                      "3.seed": 4, "6.text": "a lighthouse", "7.text": "rain"})
    ex = Executor(engine)
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    ours = ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY_SD2_V, CPU, tmp_path)
    sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="trailing")
    assert sched.config.prediction_type == "v_prediction"
    enc = loaded.clip.encoders[0]
    pipe = StableDiffusionPipeline(vae=loaded.vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer,
                                   unet=loaded.model.unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ms = DiscreteSampling.from_scheduler_config(loaded.model.scheduler_config)
    s0 = float(ksampler_sigmas(ms, "euler", "simple", 5, 1.0)[0])
    sched.set_timesteps(5)
    latents = noise_for(4, (1, 4, 8, 8)) * (1 + s0 * s0) ** 0.5 / float(sched.init_noise_sigma)
    # the prompts encoded ComfyUI's way (penultimate layer); the sampling is what is compared
    cond, _ = encode_text(loaded.clip, "a lighthouse")
    uncond, _ = encode_text(loaded.clip, "rain")
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_inference_steps=5,
                  guidance_scale=5.0, latents=latents, output_type="np").images[0]
    # v-prediction mixes x (about 15x the noise at the start) into each step: float32 differences between
    # ComfyUI's sigma table and diffusers' weigh more than with eps; still well under one 8-bit level
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_model_sampling_override(engine: EngineState) -> None:
    ex = Executor(engine)

    def latent(data: dict) -> torch.Tensor:
        ex.run(data, Hooks(), lambda: False)
        wf = Workflow.from_data(data)
        return ex.cache[ex.cache_keys(wf, execution_order(wf))["3"]].outputs[0]["samples"]

    detected = latent(txt2img(**{"4.ckpt_name": TINY_SD2_V}))
    forced = txt2img(**{"4.ckpt_name": TINY_SD2})  # the eps file, told it predicts v
    forced["10"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["4", 0], "sampling": "v_prediction",
                                                                      "zsnr": False}}
    forced["3"]["inputs"]["model"] = ["10", 0]
    as_eps = latent(txt2img(**{"4.ckpt_name": TINY_SD2}))
    as_v = latent(forced)
    assert not torch.allclose(as_eps, as_v, atol=1e-3)
    assert detected.shape == as_v.shape


def test_models_listing_names_sd2_prediction(models_dir: Path) -> None:
    from tui_diffusion.modelfiles.describe import describe_checkpoint

    eps = describe_checkpoint(models_dir / "checkpoints" / TINY_SD2, TINY_SD2)
    v = describe_checkpoint(models_dir / "checkpoints" / TINY_SD2_V, TINY_SD2_V)
    assert eps["family"] == "SD2.x (epsilon)" and v["family"] == "SD2.x (v-prediction)"

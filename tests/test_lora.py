"""LoRA: kohya files applied as patches, against diffusers with the same LoRA; the cache stays clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY, TINY_XL
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import write_kohya_lora
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.sampling import noise_for
from tui_diffusion.pipeline.schedules import ksampler_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


@pytest.fixture(scope="module")
def lora_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared models folder plus LoRA files made for the tiny SD1.x and SDXL models."""
    root = tmp_path_factory.mktemp("lora-models")
    (root / "checkpoints").symlink_to(models_dir / "checkpoints")
    cfg = tmp_path_factory.mktemp("cfg")
    sd1 = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, cfg)
    encoders = [e.model for e in sd1.clip.encoders]
    write_kohya_lora(root / "loras" / "style.safetensors", sd1.model.unet, encoders, seed=1)
    write_kohya_lora(root / "loras" / "style-ldm-names.safetensors", sd1.model.unet, encoders, seed=1,
                     original_names=True)
    write_kohya_lora(root / "loras" / "other.safetensors", sd1.model.unet, encoders, seed=2)
    # diffusers 0.42 cannot load a kohya text-encoder LoRA with transformers 5: compare on a UNet-only file
    write_kohya_lora(root / "loras" / "unet-only.safetensors", sd1.model.unet, [], seed=1)
    xl = load_checkpoint(models_dir / "checkpoints" / TINY_XL, CPU, cfg)
    write_kohya_lora(root / "loras" / "xl.safetensors", xl.model.unet, [e.model for e in xl.clip.encoders],
                     seed=3, original_names=True)
    return root


@pytest.fixture()
def engine(lora_models: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(lora_models), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def lora_workflow(**overrides: object) -> dict:
    data = json.loads((ROOT / "workflows" / "lora.json").read_text())
    settings = {"4.ckpt_name": TINY, "10.lora_name": "style.safetensors", "5.width": 64, "5.height": 64,
                "3.steps": 4, "3.seed": 9, "3.scheduler": "simple", "3.cfg": 6.0}
    settings.update(overrides)
    for target, value in settings.items():
        node_id, key = target.split(".", 1)
        data[node_id]["inputs"][key] = value
    return data


def image(ex: Executor, data: dict) -> np.ndarray:
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()


def without_lora(data: dict) -> dict:
    data = json.loads(json.dumps(data))
    del data["10"]
    data["3"]["inputs"]["model"] = ["4", 0]
    data["6"]["inputs"]["clip"] = ["4", 1]
    data["7"]["inputs"]["clip"] = ["4", 1]
    return data


def test_lora_at_strength_one_matches_diffusers_with_the_lora_loaded(engine: EngineState, lora_models: Path,
                                                                     tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    data = lora_workflow(**{"10.lora_name": "unet-only.safetensors"})
    ours = image(Executor(engine), data)
    loaded = load_checkpoint(lora_models / "checkpoints" / TINY, CPU, tmp_path / "cfg2")
    sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="trailing")
    enc = loaded.clip.encoders[0]
    pipe = StableDiffusionPipeline(vae=loaded.vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer,
                                   unet=loaded.model.unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_models / "loras" / "unet-only.safetensors"))
    ms = DiscreteSampling.from_scheduler_config(loaded.model.scheduler_config)
    s0 = float(ksampler_sigmas(ms, "euler", "simple", 4, 1.0)[0])
    sched.set_timesteps(4)
    latents = noise_for(9, (1, 4, 8, 8)) * (1 + s0 * s0) ** 0.5 / float(sched.init_noise_sigma)
    theirs = pipe(prompt=data["6"]["inputs"]["text"], negative_prompt=data["7"]["inputs"]["text"], height=64,
                  width=64, num_inference_steps=4, guidance_scale=6.0, latents=latents, output_type="np").images[0]
    np.testing.assert_allclose(ours, theirs, atol=3e-4)
    assert np.abs(ours - image(Executor(engine), without_lora(data))).max() > 1e-2  # the LoRA did something


def test_strength_zero_is_a_no_op_and_the_cached_model_stays_clean(engine: EngineState) -> None:
    ex = Executor(engine)
    base = image(ex, without_lora(lora_workflow()))
    with_lora = image(ex, lora_workflow())
    assert not np.allclose(base, with_lora)
    np.testing.assert_array_equal(image(ex, without_lora(lora_workflow(**{"3.seed": 9}))), base)
    zero = lora_workflow(**{"10.strength_model": 0.0, "10.strength_clip": 0.0})
    np.testing.assert_allclose(image(ex, zero), base, atol=1e-6)
    assert engine.models.loads == 1  # one checkpoint load for all of it


def test_kohya_original_layout_names_give_the_same_result(engine: EngineState) -> None:
    ex = Executor(engine)
    a = image(ex, lora_workflow())
    b = image(ex, lora_workflow(**{"10.lora_name": "style-ldm-names.safetensors"}))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_stacked_loras_and_model_only(engine: EngineState) -> None:
    ex = Executor(engine)
    one = image(ex, lora_workflow())
    stacked = lora_workflow()
    stacked["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1],
                                                           "lora_name": "other.safetensors", "strength_model": 0.7,
                                                           "strength_clip": 0.7}}
    for node_id, name in (("3", "model"), ("6", "clip"), ("7", "clip")):
        stacked[node_id]["inputs"][name] = ["11", 0 if name == "model" else 1]
    two = image(ex, stacked)
    assert not np.allclose(one, two, atol=1e-3)
    model_only = without_lora(lora_workflow())
    model_only["12"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0],
                                                                        "lora_name": "style.safetensors",
                                                                        "strength_model": 1.0}}
    model_only["3"]["inputs"]["model"] = ["12", 0]
    assert not np.allclose(image(ex, model_only), one, atol=1e-3)  # the text encoder is not patched


def test_sdxl_lora_with_original_names(engine: EngineState) -> None:
    data = json.loads((ROOT / "workflows" / "sdxl.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY_XL
    data["5"]["inputs"].update(width=64, height=64)
    data["3"]["inputs"]["steps"] = 2
    ex = Executor(engine)
    base = image(ex, data)
    data["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                         "lora_name": "xl.safetensors", "strength_model": 1.0,
                                                         "strength_clip": 1.0}}
    for node_id, name in (("3", "model"), ("6", "clip"), ("7", "clip")):
        data[node_id]["inputs"][name] = ["10", 0 if name == "model" else 1]
    assert not np.allclose(image(ex, data), base, atol=1e-3)


def test_lora_for_another_family_is_a_clear_error(engine: EngineState) -> None:
    data = lora_workflow(**{"10.lora_name": "xl.safetensors"})
    with pytest.raises(JobError, match="node 10 'Load LoRA': xl.safetensors: (none|only .*) of its .*layers"):
        Executor(engine).run(data, Hooks(), lambda: False)


def test_every_layer_of_a_kohya_file_finds_its_module(lora_models: Path, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.lora import load_lora, matched_modules

    sd1 = load_checkpoint(lora_models / "checkpoints" / TINY, CPU, tmp_path)
    parts = {"unet": sd1.model.unet, **sd1.clip.parts()}
    for name in ("style.safetensors", "style-ldm-names.safetensors"):
        lora = load_lora(lora_models / "loras" / name)
        assert matched_modules(parts, lora) == len(lora.pairs) > 0
        assert any(k.startswith("te1:") for k in lora.pairs)


def test_clip_strength_changes_the_encoding_and_zero_does_not(engine: EngineState) -> None:
    def cond(data: dict) -> torch.Tensor:
        ex = Executor(engine)
        ex.run(data, Hooks(), lambda: False)
        wf = Workflow.from_data(data)
        return ex.cache[ex.cache_keys(wf, execution_order(wf))["6"]].outputs[0][0][0]

    base = cond(without_lora(lora_workflow()))
    assert not torch.allclose(cond(lora_workflow(**{"10.strength_model": 0.0})), base, atol=1e-4)
    torch.testing.assert_close(cond(lora_workflow(**{"10.strength_clip": 0.0})), base)


def test_patches_restore_the_exact_weights(engine: EngineState) -> None:
    ex = Executor(engine)
    ex.run(lora_workflow(), Hooks(), lambda: False)
    loaded = next(iter(engine.models._items.values()))
    before = {k: v.clone() for k, v in loaded.model.unet.state_dict().items()}
    ex.run(lora_workflow(**{"3.seed": 10}), Hooks(), lambda: False)
    after = loaded.model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_diffusers_peft_layout_gives_the_same_result(engine: EngineState, lora_models: Path) -> None:
    from safetensors.torch import load_file, save_file

    kohya = load_file(str(lora_models / "loras" / "unet-only.safetensors"))
    loaded = load_checkpoint(lora_models / "checkpoints" / TINY, CPU, lora_models / "cfg-peft")
    names = {n.replace(".", "_"): n for n, _ in loaded.model.unet.named_modules()}
    peft = {}
    for key, tensor in kohya.items():
        stem, _, kind = key.partition(".")
        module = names[stem.removeprefix("lora_unet_")]
        if kind == "alpha":
            peft[f"unet.{module}.alpha"] = tensor
        else:
            peft[f"unet.{module}.{'lora_A' if 'down' in kind else 'lora_B'}.weight"] = tensor
    save_file(peft, str(lora_models / "loras" / "peft.safetensors"))
    ex = Executor(engine)
    a = image(ex, lora_workflow(**{"10.lora_name": "unet-only.safetensors"}))
    b = image(ex, lora_workflow(**{"10.lora_name": "peft.safetensors"}))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_compiled_unet_matches_eager_with_and_without_a_lora(lora_models: Path, tmp_path: Path) -> None:
    """--compile on the CPU freezes the weights into the compiled graph: a LoRA job must run eager (with the
    patches), and a job without one compiled, each giving the eager image."""
    compiled = resolve_device(DevicePolicy("cpu", compile=True))
    ex_c = Executor(EngineState(compiled, ModelCache(2), ModelPaths(lora_models), tmp_path / "c", tmp_path / "ct",
                                tmp_path / "cfg"))
    ex_e = Executor(EngineState(CPU, ModelCache(2), ModelPaths(lora_models), tmp_path / "e", tmp_path / "et",
                                tmp_path / "cfg"))
    data = lora_workflow(**{"10.lora_name": "unet-only.safetensors", "10.strength_clip": 0.0})
    plain = without_lora(data)
    base_c, base_e = image(ex_c, plain), image(ex_e, plain)  # the first compiled call: unpatched weights
    assert np.allclose(base_c, base_e, atol=2e-3)
    lora_c, lora_e = image(ex_c, data), image(ex_e, data)
    assert np.allclose(lora_c, lora_e, atol=2e-3)
    assert not np.allclose(lora_c, base_c, atol=1e-2)  # the LoRA did change the image
    again = image(ex_c, without_lora(lora_workflow(**{"3.seed": 10})))  # compiled again, patches gone
    assert np.allclose(again, image(ex_e, without_lora(lora_workflow(**{"3.seed": 10}))), atol=2e-3)

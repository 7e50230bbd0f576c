"""The executor in-process: numerics against diffusers, determinism, and partial re-execution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, txt2img
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.sampling import noise_for
from tui_diffusion.pipeline.schedules import ksampler_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


class Recorder(Hooks):
    def __init__(self) -> None:
        self.steps: list[tuple[str, int, int]] = []

    def progress(self, node_id: str, step: int, total: int, preview: object) -> None:
        self.steps.append((node_id, step, total))


@pytest.fixture()
def engine(models_dir: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def decoded(ex: Executor, data: dict) -> np.ndarray:
    """The VAEDecode output (float, before PNG quantisation) of the last run of ``data``."""
    wf = Workflow.from_data(data)
    keys = ex.cache_keys(wf, execution_order(wf))
    return ex.cache[keys["8"]].outputs[0][0].numpy()


def run(ex: Executor, data: dict, hooks: Hooks | None = None):
    return ex.run(data, hooks or Hooks(), lambda: False)


@pytest.mark.parametrize(("sampler", "diffusers_scheduler"),
                         [("euler", "EulerDiscreteScheduler"), ("euler_ancestral", "EulerAncestralDiscreteScheduler")])
def test_image_matches_the_diffusers_pipeline(engine: EngineState, models_dir: Path, tmp_path: Path,
                                              sampler: str, diffusers_scheduler: str) -> None:
    """Same weights, same initial noise, steps, cfg and schedule: the same image as StableDiffusionPipeline."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    seed, steps, cfg = 11, 5, 7.5
    data = txt2img(**{"3.seed": seed, "3.steps": steps, "3.cfg": cfg, "3.sampler_name": sampler,
                      "3.scheduler": "simple", "6.text": "a red fox in snow", "7.text": "blurry"})
    ex = Executor(engine)
    run(ex, data)
    ours = decoded(ex, data)

    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path / "cfg2")
    # ComfyUI's "simple" schedule at 5 steps lands on diffusers' "trailing" timesteps
    sched = getattr(diffusers, diffusers_scheduler).from_config(loaded.model.scheduler_config,
                                                                timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=loaded.vae.vae, text_encoder=loaded.clip.encoders[0].model,
                                   tokenizer=loaded.clip.encoders[0].tokenizer, unet=loaded.model.unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ms = DiscreteSampling.from_scheduler_config(loaded.model.scheduler_config)
    sigmas = ksampler_sigmas(ms, sampler, "simple", steps, 1.0)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == [float(t) for t in ms.timestep(sigmas[:-1])]
    torch.testing.assert_close(sched.sigmas, sigmas, rtol=1e-4, atol=0)
    # the same initial latent: diffusers multiplies the latents it is given by its init_noise_sigma
    s0 = float(sigmas[0])
    latents = noise_for(seed, (1, 4, 8, 8)) * (1 + s0 * s0) ** 0.5 / float(sched.init_noise_sigma)
    image = pipe(prompt="a red fox in snow", negative_prompt="blurry", height=64, width=64,
                 num_inference_steps=steps, guidance_scale=cfg, latents=latents,
                 generator=torch.Generator().manual_seed(seed + 1), output_type="np").images[0]
    assert ours.shape == image.shape == (64, 64, 3)
    np.testing.assert_allclose(ours, image, atol=2e-4)
    assert np.abs(ours - 0.5).mean() > 0.05  # a real image, not a flat one


def test_same_seed_same_pixels_other_seed_other_pixels(engine: EngineState) -> None:
    ex = Executor(engine)
    a = run(ex, txt2img(**{"3.seed": 5}))
    b = run(Executor(engine), txt2img(**{"3.seed": 5}))
    c = run(ex, txt2img(**{"3.seed": 6}))
    from PIL import Image

    pa, pb, pc = (np.asarray(Image.open(r.outputs[0])) for r in (a, b, c))
    assert a.outputs[0] != b.outputs[0]  # never overwritten
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_seed_change_reruns_only_the_sampler_and_what_follows(engine: EngineState) -> None:
    ex = Executor(engine)
    first = run(ex, txt2img(**{"3.seed": 1}))
    assert first.executed == ["4", "6", "7", "5", "3", "8", "9"]
    second = run(ex, txt2img(**{"3.seed": 2}))
    assert second.executed == ["3", "8", "9"]
    assert sorted(second.cached) == ["4", "5", "6", "7"]
    assert set(second.timings) == {"3", "8", "9"}


def test_prompt_change_reruns_one_encoder(engine: EngineState) -> None:
    ex = Executor(engine)
    run(ex, txt2img())
    again = run(ex, txt2img(**{"6.text": "another prompt"}))
    assert again.executed == ["6", "3", "8", "9"]


def test_unchanged_rerun_executes_nothing_and_reports_the_outputs(engine: EngineState) -> None:
    ex = Executor(engine)
    first = run(ex, txt2img())
    again = run(ex, txt2img())
    assert again.executed == [] and again.outputs == first.outputs


def test_checkpoint_file_change_invalidates_the_loader(engine: EngineState, models_dir: Path) -> None:
    ex = Executor(engine)
    run(ex, txt2img())
    ck = models_dir / "checkpoints" / TINY
    st = ck.stat()
    import os

    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert "4" in run(ex, txt2img()).executed
    finally:
        os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_progress_every_step(engine: EngineState) -> None:
    rec = Recorder()
    run(Executor(engine), txt2img(**{"3.steps": 6}), rec)
    assert [s for n, s, t in rec.steps if n == "3"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_sde", "ddim",
                                     "uni_pc", "pndm"])
def test_every_sampler_produces_a_finite_image(engine: EngineState, sampler: str) -> None:
    ex = Executor(engine)
    scheduler = "normal" if sampler == "pndm" else "karras"
    data = txt2img(**{"3.sampler_name": sampler, "3.scheduler": scheduler, "3.steps": 3})
    report = run(ex, data)
    image = decoded(ex, data)
    assert report.outputs and np.isfinite(image).all() and image.std() > 0.01


def test_interrupt_stops_the_sampler_within_one_step(engine: EngineState) -> None:
    from tui_diffusion.pipeline.errors import Interrupted

    ex = Executor(engine)
    hooks = Recorder()
    with pytest.raises(Interrupted):
        ex.run(txt2img(**{"3.steps": 50}), hooks, lambda: bool(hooks.steps) and hooks.steps[-1][1] >= 3)
    assert [step for node, step, _ in hooks.steps if node == "3"][-1] in (3, 4)  # the step in flight at most


def test_batch_and_partial_denoise(engine: EngineState) -> None:
    ex = Executor(engine)
    report = run(ex, txt2img(**{"5.batch_size": 2, "3.denoise": 0.5}))
    assert len(report.outputs) == 2


def test_loader_lru_keeps_models_between_jobs(engine: EngineState) -> None:
    ex = Executor(engine)
    run(ex, txt2img())
    run(ex, txt2img(**{"4.ckpt_name": "tiny-sd15-diffusers"}))
    run(ex, txt2img())
    assert engine.models.loads == 2  # switching back did not reload


def test_bad_checkpoint_fails_naming_node_and_file(broken_models: Path, tmp_path: Path) -> None:
    state = EngineState(CPU, ModelCache(1), ModelPaths(broken_models), tmp_path / "out", tmp_path / "tmp",
                        tmp_path / "cfg")
    ex = Executor(state)
    with pytest.raises(JobError) as err:
        run(ex, txt2img(**{"4.ckpt_name": "truncated.safetensors"}))
    assert err.value.node_id == "4"
    assert "node 4 'Load Checkpoint'" in err.value.message and "truncated.safetensors" in err.value.message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert run(ex, txt2img()).outputs  # the same executor carries on


def test_checkpoint_error_type_is_the_modelfiles_one() -> None:
    assert issubclass(CheckpointError, Exception)


def test_deterministic_samplers_converge_to_the_same_image(engine: EngineState) -> None:
    """Euler, Heun, LMS, DPM++ 2M and UniPC solve the same ODE: with enough steps they agree.

    A wrong noise scaling or latent space (k-diffusion vs DPM-Solver's alpha/sigma form) would not.
    """
    ex = Executor(engine)
    latents = {}
    for sampler in ("euler", "heun", "lms", "dpmpp_2m", "uni_pc"):
        data = txt2img(**{"3.sampler_name": sampler, "3.scheduler": "karras", "3.steps": 40, "3.cfg": 3.0})
        run(ex, data)
        wf = Workflow.from_data(data)
        latents[sampler] = ex.cache[ex.cache_keys(wf, execution_order(wf))["3"]].outputs[0]["samples"]
    ref = latents["heun"]
    for sampler, lat in latents.items():
        rel = ((lat - ref).norm() / ref.norm()).item()
        assert rel < 0.05, (sampler, rel)


def test_clip_set_last_layer_in_a_workflow(engine: EngineState) -> None:
    data = txt2img()
    data["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}}
    data["6"]["inputs"]["clip"] = ["10", 0]
    ex = Executor(engine)
    report = run(ex, data)
    assert "10" in report.executed
    bad = txt2img()
    bad["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -9}}
    bad["6"]["inputs"]["clip"] = ["10", 0]
    with pytest.raises(JobError, match="node 10 'CLIP Set Last Layer': stop_at_clip_layer -9: this text encoder has 2"):
        run(ex, bad)


def test_out_of_memory_names_the_node_and_suggests_lowvram(engine: EngineState, monkeypatch) -> None:
    from tui_diffusion.pipeline import registry

    def exhausted(ctx, **inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(registry.implementations(), "VAEDecode", exhausted)
    ex = Executor(engine)
    with pytest.raises(JobError) as err:
        run(ex, txt2img())
    assert err.value.node_id == "8" and "out of GPU memory" in err.value.message and "--lowvram" in err.value.message
    monkeypatch.undo()
    assert run(ex, txt2img()).outputs  # the executor carries on; the cached loader is reused


def test_a_full_disk_fails_the_job_leaves_no_partial_file_and_the_next_job_runs(engine: EngineState,
                                                                                  monkeypatch) -> None:
    import errno

    from PIL import Image

    ex = Executor(engine)
    run(ex, txt2img())  # models loaded; one image written
    before = sorted(p.name for p in engine.output_dir.iterdir())
    original = Image.Image.save

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")  # what a write cut short leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(JobError) as err:
        run(ex, txt2img(**{"3.seed": 99}))
    assert err.value.node_id == "9" and "No space left on device" in err.value.message
    assert sorted(p.name for p in engine.output_dir.iterdir()) == before  # no temporary or partial file
    monkeypatch.setattr(Image.Image, "save", original)
    assert run(ex, txt2img(**{"3.seed": 99})).outputs


def test_memory_error_names_the_node(engine: EngineState, monkeypatch) -> None:
    from tui_diffusion.pipeline import registry

    def exhausted(ctx, **inputs):
        raise MemoryError()

    monkeypatch.setitem(registry.implementations(), "KSampler", exhausted)
    with pytest.raises(JobError, match="node 3 'KSampler': out of memory"):
        run(Executor(engine), txt2img())

"""The custom sampling nodes on the tiny SD1 checkpoint: the same settings give KSampler's latent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import txt2img
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.nodes_sampling import flip_sigmas, split_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
SEED, STEPS, CFG = 3, 4, 6.0


@pytest.fixture()
def engine(models_dir: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp_path / "out", tmp_path / "tmp",
                       tmp_path / "cfg")


def output(ex: Executor, data: dict, node_id: str, index: int = 0):
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))[node_id]].outputs[index]


def run(ex: Executor, data: dict):
    return ex.run(data, Hooks(), lambda: False)


def sampled(ex: Executor, data: dict, node_id: str = "3", index: int = 0) -> torch.Tensor:
    """Run ``data`` and read one node's LATENT right away (the executor's cache keeps few outputs)."""
    run(ex, data)
    return output(ex, data, node_id, index)["samples"]


def ksampler_graph(sampler: str = "euler") -> dict:
    return txt2img(**{"3.seed": SEED, "3.steps": STEPS, "3.cfg": CFG, "3.sampler_name": sampler,
                      "3.scheduler": "normal"})


def custom_graph(sampler: str = "euler") -> dict:
    """txt2img with KSampler replaced by SamplerCustomAdvanced fed by ComfyUI's custom sampling nodes."""
    data = ksampler_graph()
    del data["3"]
    data.update({
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": CFG}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}},
        "3": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                "latent_image": ["5", 0]}},
    })
    return data


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_sampler_custom_advanced_gives_ksamplers_latent(engine: EngineState, sampler: str) -> None:
    ex = Executor(engine)
    plain, custom = ksampler_graph(sampler), custom_graph(sampler)
    assert not validate_workflow(Workflow.from_data(custom))
    expected = sampled(ex, plain)
    got = sampled(ex, custom)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    denoised = output(ex, custom, "3", 1)["samples"]  # the last step's prediction (at the last sigma above 0)
    assert denoised.shape == got.shape
    if sampler == "euler":  # Euler's last step, to sigma 0, lands on that prediction
        torch.testing.assert_close(denoised, got)


def test_sampler_custom_gives_ksamplers_latent(engine: EngineState) -> None:
    ex = Executor(engine)
    data = custom_graph()
    data["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["6", 0],
        "negative": ["7", 0], "sampler": ["22", 0], "sigmas": ["23", 0], "latent_image": ["5", 0]}}
    for unused in ("20", "21"):
        del data[unused]
    expected = sampled(ex, ksampler_graph())
    torch.testing.assert_close(sampled(ex, data), expected, rtol=0, atol=0)


def test_split_sigmas_in_two_stages_equals_one_walk(engine: EngineState) -> None:
    """High sigmas with noise, then low sigmas without: Euler gives the single walk's latent."""
    ex = Executor(engine)
    data = custom_graph()
    data["24"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["23", 0], "step": 2}}
    data["3"]["inputs"]["sigmas"] = ["24", 0]
    data["25"] = {"class_type": "DisableNoise", "inputs": {}}
    data["26"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["25", 0], "guider": ["21", 0], "sampler": ["22", 0], "sigmas": ["24", 1],
        "latent_image": ["3", 0]}}
    data["8"]["inputs"]["samples"] = ["26", 0]
    expected = sampled(ex, custom_graph())
    torch.testing.assert_close(sampled(ex, data, "26"), expected, rtol=1e-5, atol=1e-5)


def test_basic_guider_is_cfg_1(engine: EngineState) -> None:
    ex = Executor(engine)
    basic = custom_graph()
    basic["21"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    plain = txt2img(**{"3.seed": SEED, "3.steps": STEPS, "3.cfg": 1.0, "3.scheduler": "normal"})
    expected = sampled(ex, plain)
    torch.testing.assert_close(sampled(ex, basic), expected, rtol=0, atol=0)


def test_sd_turbo_scheduler_and_the_sigma_tools(engine: EngineState) -> None:
    ex = Executor(engine)
    data = custom_graph()
    data["23"] = {"class_type": "SDTurboScheduler", "inputs": {"model": ["4", 0], "steps": 2, "denoise": 1.0}}
    run(ex, data)
    ms = DiscreteSampling()
    torch.testing.assert_close(output(ex, data, "23"), torch.stack([ms.sigma(torch.tensor(999.0)),
                                                                    ms.sigma(torch.tensor(899.0)),
                                                                    torch.tensor(0.0)]).float())
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.0])
    high, low = split_sigmas(None, sigmas, 1).outputs
    assert high.tolist() == [3.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    flipped = flip_sigmas(None, sigmas).outputs[0]
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 3.0]) and sigmas[0] == 3.0


def test_model_sampling_nodes_follow_the_family(engine: EngineState) -> None:
    ex = Executor(engine)
    data = custom_graph()
    data["30"] = {"class_type": "ModelSamplingContinuousEDM", "inputs": {"model": ["4", 0], "sampling": "eps",
                                                                        "sigma_max": 14.6, "sigma_min": 0.03}}
    data["21"]["inputs"]["model"] = ["30", 0]
    data["23"]["inputs"]["model"] = ["30", 0]
    run(ex, data)
    sigmas = output(ex, data, "23")
    assert float(sigmas[0]) == pytest.approx(14.6, rel=1e-4) and torch.isfinite(output(ex, data, "3")["samples"]).all()
    aura = custom_graph()
    aura["30"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["4", 0], "shift": 1.73}}
    aura["21"]["inputs"]["model"] = ["30", 0]
    with pytest.raises(JobError, match="ModelSamplingAuraFlow needs a rectified-flow model; a SD1.x model"):
        run(ex, aura)

"""The memory policy: which model is on which device when (--lowvram, --novram, precisions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, txt2img
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.executor import Executor, Hooks, execution_order
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.placement import home_device
from tui_diffusion.settings import DevicePolicy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_policy_on_the_cpu() -> None:
    d = resolve_device(DevicePolicy("cpu", memory="lowvram"))
    assert (d.torch_device.type, d.dtype, d.vae_dtype, d.offload, d.vae_tiling) == (
        "cpu", torch.float32, torch.float32, "none", True)
    d = resolve_device(DevicePolicy("cpu", precision="bf16", vae_precision="bf16"))
    assert (d.dtype, d.vae_dtype, d.offload) == (torch.bfloat16, torch.bfloat16, "none")


@needs_cuda
@pytest.mark.parametrize(("memory", "offload"), [("normal", "none"), ("highvram", "none"), ("lowvram", "model"),
                                                 ("novram", "sequential")])
def test_policy_on_a_gpu(memory: str, offload: str) -> None:
    d = resolve_device(DevicePolicy("auto", memory=memory))
    assert d.torch_device.type == "cuda" and d.dtype == torch.float16 and d.vae_dtype == torch.float32
    assert d.offload == offload and d.vae_tiling == (memory in ("lowvram", "novram"))


def _run(models_dir: Path, tmp_path: Path, policy: DevicePolicy) -> tuple[np.ndarray, EngineState]:
    engine = EngineState(resolve_device(policy), ModelCache(1), ModelPaths(models_dir), tmp_path / "out",
                         tmp_path / "tmp", tmp_path / "cfg")
    ex = Executor(engine)
    data = txt2img()
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy(), engine


@needs_cuda
@pytest.mark.parametrize("memory", ["lowvram", "novram"])
def test_offloaded_models_rest_off_the_gpu_and_give_the_same_image(models_dir: Path, tmp_path: Path,
                                                                   memory: str) -> None:
    reference, _ = _run(models_dir, tmp_path / "a", DevicePolicy("auto"))
    image, engine = _run(models_dir, tmp_path / "b", DevicePolicy("auto", memory=memory))
    loaded = next(iter(engine.models._items.values()))
    rest = {"lowvram": "cpu", "novram": "meta"}[memory]
    for module in (loaded.model.unet, loaded.vae.vae, loaded.clip.encoders[0].model):
        assert home_device(module).type == rest, memory
    np.testing.assert_allclose(image, reference, atol=2e-2)


def test_loaded_models_follow_the_precision(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY,
                             resolve_device(DevicePolicy("cpu", precision="bf16")), tmp_path)
    assert loaded.model.unet.dtype == torch.bfloat16 and loaded.vae.vae.dtype == torch.float32

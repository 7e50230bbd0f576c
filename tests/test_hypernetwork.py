"""Hypernetworks: A1111 files (.pt under the pickle policy, .safetensors) read as ComfyUI reads them, the key/value
formula against a direct computation, and HypernetworkLoader + KSampler through the executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY, txt2img
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer_gligen import hypernetwork_dict, write_hypernetwork
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.hypernetwork import (
    HypernetworkPatch,
    applied,
    attention_layers,
    build_mlp,
    load_hypernetwork,
)
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
#: the tiny SD1.x UNet's attention key widths: 32 (level 0 self-attention), 64 (mid self-attention, the text)
WIDTHS = (32, 64)
FLAGS = {"activation_func": "relu", "is_layer_norm": True, "use_dropout": True}


@pytest.fixture(scope="module")
def data() -> dict:
    return hypernetwork_dict(WIDTHS, (1, 2, 1), seed=4, **FLAGS)


@pytest.fixture(scope="module")
def root(models_dir: Path, data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hn-models")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / TINY).symlink_to(models_dir / "checkpoints" / TINY)
    hn = root / "hypernetworks"
    write_hypernetwork(hn / "hn.pt", data)
    write_hypernetwork(hn / "hn.safetensors", data)
    write_hypernetwork(hn / "linear.safetensors", hypernetwork_dict(WIDTHS, (1, 1.5, 2, 1), "linear", seed=5))
    write_hypernetwork(hn / "other.safetensors", hypernetwork_dict((320, 768), seed=6))
    write_hypernetwork(hn / "gelu.safetensors", hypernetwork_dict(WIDTHS, activation_func="gelu", seed=7))
    return root


def engine_for(root: Path, tmp: Path, allow_pickle: bool) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(root), tmp / "out", tmp / "tmp", tmp / "cfg",
                       allow_pickle=allow_pickle)


@pytest.fixture(scope="module")
def executor(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    return Executor(engine_for(root, tmp_path_factory.mktemp("hn-engine"), allow_pickle=True))


SD1 = {"3.seed": 5, "3.steps": 3, "3.cfg": 7.0, "3.scheduler": "simple", "6.text": "a castle", "7.text": "blurry"}


def with_hypernetwork(name: str, strength: float, *more: tuple[str, float]) -> dict:
    data = txt2img(**SD1)
    model = ["4", 0]
    for i, (n, s) in enumerate(((name, strength), *more)):
        data[str(10 + i)] = {"class_type": "HypernetworkLoader",
                             "inputs": {"model": model, "hypernetwork_name": n, "strength": s}}
        model = [str(10 + i), 0]
    data["3"]["inputs"]["model"] = model
    return data


def decoded(ex: Executor, data: dict) -> np.ndarray:
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()


def tiny_unet(engine: EngineState) -> torch.nn.Module:
    """The tiny checkpoint's UNet as the engine caches it (the one its jobs sample with)."""
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    return implementations()["CheckpointLoaderSimple"](ctx, ckpt_name=TINY).outputs[0].unet


def direct_mlp(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """relu + layer norm + dropout flags, by hand from the file's tensors: Linear, ReLU, LayerNorm (dropout does
    nothing at inference) for each layer, the last one included (ComfyUI counts the norms in its layer list, so the
    output Linear is not the list's last and gets the activation)."""
    w = [k.removesuffix(".weight") for k in sd if k.endswith(".weight")]
    for lin, norm in zip(w[::2], w[1::2], strict=True):
        x = F.relu(F.linear(x, sd[f"{lin}.weight"], sd[f"{lin}.bias"]))
        x = F.layer_norm(x, (x.shape[-1],), sd[f"{norm}.weight"], sd[f"{norm}.bias"])
    return x


# -- reading ----------------------------------------------------------------------------------------------------
def test_mlps_are_read_as_comfyui_reads_the_flags(data: dict) -> None:
    mlp = build_mlp(data[32][0], {**FLAGS, "activate_output": False, "last_layer_dropout": False})
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "ReLU",
                                               "LayerNorm"]
    assert not mlp.training  # dropout off at inference
    plain = hypernetwork_dict((32,), (1, 2, 1), "tanh", seed=1)
    flags = {"activation_func": "tanh", "is_layer_norm": False, "use_dropout": True, "activate_output": False,
             "last_layer_dropout": False}
    assert [type(m).__name__ for m in build_mlp(plain[32][0], flags)] == ["Linear", "Tanh", "Linear"]
    assert [type(m).__name__ for m in build_mlp(plain[32][0], {**flags, "activate_output": True})] == \
        ["Linear", "Tanh", "Linear", "Tanh"]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), direct_mlp(data[32][0], x))


def test_safetensors_and_pickle_files_hold_the_same_hypernetwork(root: Path, data: dict) -> None:
    pt = load_hypernetwork(root / "hypernetworks" / "hn.pt", allow_pickle=True)
    st = load_hypernetwork(root / "hypernetworks" / "hn.safetensors")
    assert set(pt.layers) == set(st.layers) == set(WIDTHS)
    assert pt.flags == st.flags == {**FLAGS, "activate_output": False, "last_layer_dropout": False}
    x = torch.randn(3, 64)
    for i in (0, 1):
        torch.testing.assert_close(pt.layers[64][i](x), st.layers[64][i](x), rtol=0, atol=0)
        torch.testing.assert_close(st.layers[64][i](x), direct_mlp(data[64][i], x))


def test_pickles_are_refused_unless_allowed_and_then_weights_only(root: Path, tmp_path: Path) -> None:
    with pytest.raises(NodeError, match=r"hn\.pt: pickle files.*--allow-pickle"):
        load_hypernetwork(root / "hypernetworks" / "hn.pt")
    torch.save({32: [{}, {}], "activation_func": Path("relu")}, tmp_path / "code.pt")  # an object, not weights
    with pytest.raises(NodeError, match="refused: this pickle holds more than weights"):
        load_hypernetwork(tmp_path / "code.pt", allow_pickle=True)


@pytest.mark.parametrize(("name", "why"), [
    ("gelu.safetensors", "activation function 'gelu' is not supported"),
    ("other.safetensors", r"none of its widths \(320, 768\) is an attention width of this SD1.x model"),
])
def test_files_that_cannot_apply_say_why(executor: Executor, name: str, why: str) -> None:
    with pytest.raises(JobError, match=why):
        executor.run(with_hypernetwork(name, 1.0), Hooks(), lambda: False)


# -- the formula ------------------------------------------------------------------------------------------------
def test_key_and_value_inputs_against_a_direct_computation(executor: Executor, data: dict) -> None:
    """In self- and cross-attention: k = to_k(c + mlp_k(c) s), v = to_v(c + mlp_v(c) s), the query untouched
    (c: the hidden states for self-attention, the text for cross-attention); the hooks go away afterwards."""
    unet = tiny_unet(executor.engine)
    hn = load_hypernetwork(Path(executor.engine.paths.resolve("hypernetworks", "hn.safetensors")))
    strength = 0.7
    torch.manual_seed(1)
    layers = attention_layers(unet)
    assert len(layers) == 8  # 4 transformer blocks, self- and cross-attention each
    for attn in layers:
        x = torch.randn(2, 16, attn.to_q.in_features)
        c = torch.randn(2, 7, attn.to_k.in_features) if attn.is_cross_attention else x
        with torch.no_grad():
            plain = attn(x, encoder_hidden_states=c if attn.is_cross_attention else None)
            with applied(unet, [HypernetworkPatch(hn, strength)], torch.device("cpu"), torch.float32):
                ours = attn(x, encoder_hidden_states=c if attn.is_cross_attention else None)
            width = c.shape[-1]
            q = attn.to_q(x)
            k = attn.to_k(c + direct_mlp(data[width][0], c) * strength)
            v = attn.to_v(c + direct_mlp(data[width][1], c) * strength)
            heads = attn.heads
            split = [t.reshape(2, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(2, -1, q.shape[-1])
            direct = attn.to_out[0](out)
        torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)
        assert (ours - plain).abs().max() > 1e-3
        assert not attn.to_k._forward_pre_hooks and not attn.to_v._forward_pre_hooks


# -- sampling ---------------------------------------------------------------------------------------------------
def test_workflow_runs_end_to_end_and_strength_zero_is_the_plain_model(executor: Executor, root: Path) -> None:
    data = with_hypernetwork("hn.safetensors", 1.0)
    assert validate_workflow(Workflow.from_data(data), ModelPaths(root)) == []
    plain = decoded(executor, txt2img(**SD1))
    ours = decoded(executor, data)
    assert np.abs(ours - plain).max() > 1e-2
    np.testing.assert_array_equal(decoded(executor, with_hypernetwork("hn.safetensors", 0.0)), plain)
    # the pickle (allowed in this engine) stacked with a second one: each sees the inputs the first changed
    stacked = decoded(executor, with_hypernetwork("hn.pt", 1.0, ("linear.safetensors", 1.0)))
    assert np.abs(stacked - ours).max() > 1e-3 and np.abs(stacked - plain).max() > 1e-3
    assert not any(m._forward_pre_hooks for m in tiny_unet(executor.engine).modules())  # the cached UNet is clean


def test_a_compiled_unet_runs_uncompiled_while_patched(executor: Executor) -> None:
    """A compiled graph does not see hooks added after it was traced: while patched, the UNet runs eagerly, and
    its compiled call is back afterwards."""
    unet = tiny_unet(executor.engine)
    hn = load_hypernetwork(Path(executor.engine.paths.resolve("hypernetworks", "hn.safetensors")))

    def compiled(*args: object, **kwargs: object) -> None:
        raise AssertionError("the compiled graph ran")

    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 64)
    unet._compiled_call_impl = compiled
    try:
        with torch.no_grad(), applied(unet, [HypernetworkPatch(hn, 1.0)], torch.device("cpu"), torch.float32):
            unet(x, t, encoder_hidden_states=c)
        assert unet._compiled_call_impl is compiled
        with pytest.raises(AssertionError, match="compiled graph ran"):
            unet(x, t, encoder_hidden_states=c)
    finally:
        unet._compiled_call_impl = None

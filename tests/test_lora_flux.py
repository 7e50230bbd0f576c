"""LoRAs for the Flux transformer (ComfyUI's OneReward template loads one with LoraLoaderModelOnly): files in
diffusers' names, in Black Forest Labs' names (ComfyUI's ``diffusion_model.*`` and kohya's ``lora_unet_*``, whose
fused layers cover several of diffusers' layers) patch the layers they name by ``up @ down * alpha / rank *
strength``, in fp8 storage too, and the model is as loaded afterwards. They were refused ("a LoRA for a transformer
model ... not supported yet") before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline.lora import Patch, load_lora, matched_modules, patched

SIZES = w.TinyFlux()
RANK, ALPHA, STRENGTH = 2, 1.0, 0.5
#: the layers the LoRA names, in Black Forest Labs' layout: fused ones (qkv, linear1), the final modulation (its
#: halves swapped in diffusers' layout), plain ones
BFL_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
              "double_blocks.0.img_mlp.0", "single_blocks.0.linear1", "single_blocks.0.linear2",
              "final_layer.adaLN_modulation.1", "img_in", "time_in.in_layer")


def _model() -> torch.nn.Module:
    return w.build_flux_transformer(SIZES, seed=0).eval()


def _original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in Black Forest Labs' layout (as the loader reads them)."""
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return w.flux_to_original(state, SIZES.layers, SIZES.single_layers)


def _pairs(names: tuple[str, ...], shapes: dict[str, torch.Size]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {n: (torch.randn(RANK, shapes[n][1], generator=gen), torch.randn(shapes[n][0], RANK, generator=gen))
            for n in names}


def _write(path: Path, layout: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    sd = {}
    for name, (down, up) in pairs.items():
        if layout == "comfyui":  # ComfyUI's own LoRA files of Flux
            key, d, u = f"diffusion_model.{name}", "lora_A", "lora_B"
        elif layout == "kohya":
            key, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"
        else:  # diffusers/PEFT
            key, d, u = f"transformer.{name}", "lora_A", "lora_B"
        sd[f"{key}.{d}.weight"], sd[f"{key}.{u}.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_a_lora_in_black_forest_labs_names_patches_the_layers_it_names(tmp_path: Path, layout: str) -> None:
    model = _model()
    before = _original(model)
    pairs = _pairs(BFL_LAYERS, {n: before[f"{n}.weight"].shape for n in BFL_LAYERS})
    lora = load_lora(_write(tmp_path / "flux.safetensors", layout, pairs))
    # every pair of the file fits (a fused qkv or linear1 as the diffusers layers it is cut into)
    assert matched_modules({"unet": model}, lora) == len(lora.pairs) == len(BFL_LAYERS)
    with patched({"unet": model}, [Patch(lora, STRENGTH)]):
        during = _original(model)
    for key, value in during.items():
        name = key.removesuffix(".weight")
        expected = before[key]
        if name in pairs:
            down, up = pairs[name]
            expected = expected + up @ down * (ALPHA / RANK) * STRENGTH
        torch.testing.assert_close(value, expected, msg=key)
    after = _original(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_lora_in_diffusers_names_patches_the_transformer(tmp_path: Path) -> None:
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp", "proj_out")
    pairs = _pairs(names, {n: state[f"{n}.weight"].shape for n in names})
    lora = load_lora(_write(tmp_path / "flux.safetensors", "diffusers", pairs))
    with patched({"unet": model}, [Patch(lora, STRENGTH)]):
        for name, (down, up) in pairs.items():
            torch.testing.assert_close(model.get_parameter(f"{name}.weight"),
                                       state[f"{name}.weight"] + up @ down * (ALPHA / RANK) * STRENGTH)
        assert torch.equal(model.get_parameter("x_embedder.weight"), state["x_embedder.weight"])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fp8_weights_are_patched_in_float32_and_rounded_once() -> None:
    """fp8 storage (ComfyUI's fp8 files, the OneReward transformer) has no in-place addition."""
    from tui_diffusion.pipeline.lora import LoraWeights

    layer = torch.nn.Linear(8, 6, bias=False)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    net = torch.nn.Sequential(layer)
    original = layer.weight.detach().clone()
    down, up = torch.randn(RANK, 8), torch.randn(6, RANK)
    lora = LoraWeights("fp8.safetensors", {"unet:0": (down, up, None)})
    with patched({"unet": net}, [Patch(lora, 1.0)]):
        expected = (original.float() + up @ down).to(torch.float8_e4m3fn)
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight.float(), expected.float())
    assert torch.equal(layer.weight.float(), original.float())


def test_a_flux_lora_on_an_sd1_model_is_named_as_another_familys(tmp_path: Path, models_dir: Path) -> None:
    from tests.conftest import TINY
    from tests.dit_helpers import CPU
    from tui_diffusion.pipeline import nodes
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.models import load_checkpoint

    model = _model()
    before = _original(model)
    pairs = _pairs(BFL_LAYERS[:2], {n: before[f"{n}.weight"].shape for n in BFL_LAYERS[:2]})
    lora = load_lora(_write(tmp_path / "flux.safetensors", "comfyui", pairs))
    sd1 = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path / "cfg")
    with pytest.raises(NodeError, match=r"flux\.safetensors: none of its layers belong to this model"):
        nodes._with_patch(sd1.model, {"unet": sd1.model.unet}, lora, 1.0, "model")

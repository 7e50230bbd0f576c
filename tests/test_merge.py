"""Model merging (patches, as ComfyUI's add_patches) and CheckpointSave, on tiny SD1.x and SDXL checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import ROOT, TINY, TINY_SD2_V, TINY_XL
from tui_diffusion.graph import Workflow, validate_workflow
from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.graph.specs_merge import SDXL_BLOCKS
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import (
    TinySD1,
    build_sd1_models,
    write_kohya_lora,
    write_sd1_checkpoint,
    write_sdxl_checkpoint,
)
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, Hooks, execution_order
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.merge import block_ratio, unet_block_names
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
SD1_B = "tiny-sd15-b.safetensors"
XL_B = "tiny-sdxl-b.safetensors"
INPAINT_B = "tiny-sd15-inpaint-b.safetensors"


@pytest.fixture(scope="module")
def root(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny checkpoints and a second SD1.x, inpainting and SDXL model of other weights (seed 1)."""
    root = tmp_path_factory.mktemp("merge-models")
    (root / "checkpoints").mkdir()
    for name in (TINY, TINY_XL, TINY_SD2_V):
        (root / "checkpoints" / name).symlink_to(models_dir / "checkpoints" / name)
    write_sd1_checkpoint(root / "checkpoints" / SD1_B, seed=1)
    unet = build_sd1_models(TinySD1())[0]  # the layer names and sizes of the tiny SD1.x UNet
    write_kohya_lora(root / "loras" / "b-style.safetensors", unet, [], seed=4, scale=0.3)
    write_sd1_checkpoint(root / "checkpoints" / INPAINT_B, TinySD1(in_channels=9), seed=1)
    write_sdxl_checkpoint(root / "checkpoints" / XL_B, seed=1)
    return root


@pytest.fixture(scope="module")
def engine(root: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineState:
    tmp = tmp_path_factory.mktemp("merge-engine")
    return EngineState(CPU, ModelCache(8), ModelPaths(root), tmp / "out", tmp / "tmp", tmp / "cfg")


def ctx(engine: EngineState, workflow: dict | None = None) -> NodeContext:
    return NodeContext(engine, "1", workflow or {}, report=lambda *a: None, interrupted=lambda: False)


def run(engine: EngineState, class_type: str, **inputs: Any) -> tuple:
    return implementations()[class_type](ctx(engine), **inputs).outputs


def loaded(engine: EngineState, name: str) -> tuple:
    return run(engine, "CheckpointLoaderSimple", ckpt_name=name)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def merged_unet(model: Any) -> dict[str, torch.Tensor]:
    """The UNet's parameters as the sampler sees them (the model's patches applied)."""
    with patched({"unet": model.unet}, list(model.patches)):
        return state(model.unet)


def assert_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)


@pytest.fixture(scope="module")
def sd1(engine: EngineState) -> tuple:
    """(model, clip, vae) of two SD1.x checkpoints of different weights, and their unpatched UNet parameters."""
    a, b = loaded(engine, TINY), loaded(engine, SD1_B)
    return a, b, state(a[0].unet), state(b[0].unet)


def test_simple_ratio_one_and_zero_are_the_inputs_and_half_the_average(engine: EngineState, sd1: tuple) -> None:
    (a, *_), (b, *_), wa, wb = sd1
    same = run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=1.0)[0]
    assert same is a  # nothing of model2 taken
    assert_states(merged_unet(run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=0.0)[0]), wb)
    half = run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=0.5)[0]
    assert_states(merged_unet(half), {k: (wa[k] + wb[k]) / 2 for k in wa}, atol=1e-6)
    quarter = run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=0.25)[0]
    assert_states(merged_unet(quarter), {k: 0.25 * wa[k] + 0.75 * wb[k] for k in wa}, atol=1e-6)
    # the merge is a patch: the inputs' handles and the loaded weights are as they were
    assert a.patches == () and b.patches == () and len(half.patches) == 1 and half.unet is a.unet
    assert_states(state(a.unet), wa)
    assert_states(state(b.unet), wb)


def test_add_and_subtract_as_comfyui_defines_them(engine: EngineState, sd1: tuple) -> None:
    (a, *_), (b, *_), wa, wb = sd1
    added = run(engine, "ModelMergeAdd", model1=a, model2=b)[0]
    assert_states(merged_unet(added), {k: wa[k] + wb[k] for k in wa}, atol=1e-6)
    diff = run(engine, "ModelMergeSubtract", model1=a, model2=b, multiplier=2.0)[0]
    assert_states(merged_unet(diff), {k: 2.0 * (wa[k] - wb[k]) for k in wa}, atol=1e-6)
    # patches apply in order, each on what the ones before made: (a - b) + b is a again
    back = run(engine, "ModelMergeAdd", model1=run(engine, "ModelMergeSubtract", model1=a, model2=b)[0], model2=b)[0]
    assert_states(merged_unet(back), wa, atol=1e-5)
    assert_states(state(a.unet), wa)


def test_merging_a_model_with_a_patched_copy_of_itself(engine: EngineState, sd1: tuple) -> None:
    """model2 shares model1's UNet module (a merge of it): its weights are read unpatched, then patched."""
    (a, *_), (b, *_), wa, wb = sd1
    like_b = run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=0.0)[0]  # a's module, b's weights
    assert like_b.unet is a.unet
    mixed = run(engine, "ModelMergeSimple", model1=a, model2=like_b, ratio=0.5)[0]
    assert_states(merged_unet(mixed), {k: (wa[k] + wb[k]) / 2 for k in wa}, atol=1e-6)
    # the same module on both sides, unpatched: model2's weights are read before model1's change
    assert_states(merged_unet(run(engine, "ModelMergeAdd", model1=a, model2=a)[0]), {k: 2 * wa[k] for k in wa})
    assert_states(state(a.unet), wa)


def taken(got: dict[str, torch.Tensor], wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor]) -> set[str]:
    """The parameters (of those that differ between the two models) that are model2's; the others must be
    model1's (random init leaves the norms equal in both)."""
    differ = {k for k in wa if not torch.equal(wa[k], wb[k])}
    from_b = {k for k in differ if torch.equal(got[k], wb[k])}
    assert all(torch.equal(got[k], wa[k]) for k in differ - from_b)
    return from_b


def test_model2_s_own_patches_are_merged_in(engine: EngineState, sd1: tuple) -> None:
    """ComfyUI merges model2 as its patches make it (get_key_patches): a LoRA on model2 is part of the merge."""
    (a, *_), (b, *_), wa, wb = sd1
    styled = run(engine, "LoraLoaderModelOnly", model=b, lora_name="b-style.safetensors", strength_model=0.8)[0]
    with_lora = merged_unet(styled)
    changed = {k for k in wb if not torch.equal(with_lora[k], wb[k])}
    assert changed and all(k.endswith(".weight") for k in changed)
    got = merged_unet(run(engine, "ModelMergeSimple", model1=a, model2=styled, ratio=0.5)[0])
    assert_states(got, {k: (wa[k] + with_lora[k]) / 2 for k in wa}, atol=1e-6)
    assert_states(state(b.unet), wb)


def test_blocks_route_input_middle_and_out_to_their_modules(engine: EngineState, sd1: tuple) -> None:
    (a, *_), (b, *_), wa, wb = sd1
    differ = {k for k in wa if not torch.equal(wa[k], wb[k])}
    middle = merged_unet(run(engine, "ModelMergeBlocks", model1=a, model2=b, input=1.0, middle=0.0, out=1.0)[0])
    assert taken(middle, wa, wb) == {k for k in differ if k.startswith("mid_block.")} != set()
    # "input" is also the ratio of what no input names (the time embedding), "out" covers out.* (the last norm
    # and convolution) as well as the output blocks, as in ComfyUI
    inputs = merged_unet(run(engine, "ModelMergeBlocks", model1=a, model2=b, input=0.0, middle=1.0, out=1.0)[0])
    assert taken(inputs, wa, wb) == {k for k in differ if k.startswith(("down_blocks.", "conv_in.", "time_embedding."))}
    outs = merged_unet(run(engine, "ModelMergeBlocks", model1=a, model2=b, input=1.0, middle=1.0, out=0.0)[0])
    assert taken(outs, wa, wb) == {k for k in differ if k.startswith(("up_blocks.", "conv_out."))}
    assert "conv_out.weight" in differ and "time_embedding.linear_1.weight" in differ


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_blend_in_float32_and_round_once(dtype: torch.dtype) -> None:
    """GPU models run in half precision: the blend is computed in float32 (as ComfyUI patches) and restored
    exactly, also when the job fails while the model is patched."""
    from tui_diffusion.pipeline.merge import MergePatch

    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 64).to(dtype), torch.nn.Linear(64, 64).to(dtype)
    before = state(first)
    patch = MergePatch({"unet": second}, keep=0.3, take=0.7)
    with pytest.raises(RuntimeError, match="job failed"), patched({"unet": first}, [patch]):
        for name, param in first.named_parameters():
            want = (before[name].float() * 0.3 + dict(second.named_parameters())[name].float() * 0.7).to(dtype)
            assert torch.equal(param, want), name
        raise RuntimeError("job failed")
    assert_states(state(first), before)


def test_the_block_name_mapping_on_sdxl_s_real_layout() -> None:
    """diffusers names -> the original names ComfyUI's block inputs are prefixes of, on a UNet laid out as SDXL's
    (three levels of two layers, attention from the second level, downsamplers and upsamplers) at tiny widths."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, transformer_layers_per_block=(1, 1, 1), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40)
    names = unet_block_names(unet)
    assert len(names) == len(list(unet.named_parameters()))
    expected = {
        "time_embedding.linear_1.weight": "time_embed.0.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
        "conv_in.weight": "input_blocks.0.0.weight",
        "down_blocks.0.resnets.1.conv1.weight": "input_blocks.2.0.in_layers.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.4.1.proj_in.weight",
        "down_blocks.2.resnets.1.norm1.weight": "input_blocks.8.0.in_layers.0.weight",
        "mid_block.resnets.1.conv2.weight": "middle_block.2.out_layers.3.weight",
        "mid_block.attentions.0.proj_out.weight": "middle_block.1.proj_out.weight",
        "up_blocks.0.resnets.2.conv_shortcut.weight": "output_blocks.2.0.skip_connection.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
        "up_blocks.1.attentions.1.proj_out.bias": "output_blocks.4.1.proj_out.bias",
        "up_blocks.2.resnets.0.conv1.weight": "output_blocks.6.0.in_layers.2.weight",
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.bias": "out.2.bias",
    }
    assert {k: names[k] for k in expected} == expected
    ratios = {name: i / 100 for i, name in enumerate(SDXL_BLOCKS)}
    assert block_ratio("input_blocks.4.1.proj_in.weight", ratios) == ratios["input_blocks.4"]
    assert block_ratio("out.2.bias", ratios) == ratios["out."]
    assert block_ratio("output_blocks.2.2.conv.weight", ratios) == ratios["output_blocks.2"]
    assert block_ratio(None, ratios) == ratios["time_embed."]  # not a UNet name: the first input's


def test_sdxl_per_block_merge(engine: EngineState) -> None:
    (a, *_), (b, *_) = loaded(engine, TINY_XL), loaded(engine, XL_B)
    wa, wb = state(a.unet), state(b.unet)
    inputs = {n: 1.0 for n in SDXL_BLOCKS} | {"input_blocks.1": 0.0, "label_emb.": 0.0, "out.": 0.25}
    got = merged_unet(run(engine, "ModelMergeSDXL", model1=a, model2=b, **inputs)[0])
    # tiny SDXL: one layer per level, so input block 1 is the first level's resnet (it has no attention)
    out = [k for k in wa if k.startswith(("conv_out.", "conv_norm_out."))]
    for key in out:
        torch.testing.assert_close(got[key], 0.25 * wa[key] + 0.75 * wb[key])
    wa, wb = ({k: v for k, v in w.items() if k not in out} for w in (wa, wb))
    differ = {k for k in wa if not torch.equal(wa[k], wb[k])}
    assert taken(got, wa, wb) == {k for k in differ if k.startswith(("down_blocks.0.resnets.0.", "add_embedding."))}
    assert NODE_SPECS["ModelMergeSDXL"].input("input_blocks.8").default == 1.0


def test_models_of_different_architectures_are_refused_an_inpainting_input_as_comfyui(engine: EngineState,
                                                                                   sd1: tuple) -> None:
    (a, *_), _, wa, _ = sd1
    xl = loaded(engine, TINY_XL)[0]
    with pytest.raises(NodeError, match="model2 .*SDXL.*same architecture"):
        run(engine, "ModelMergeSimple", model1=a, model2=xl, ratio=0.5)
    # 9 input channels: conv_in cannot take model2's weight; as in ComfyUI it is only scaled by model1's ratio
    inpaint = loaded(engine, INPAINT_B)[0]
    got = merged_unet(run(engine, "ModelMergeSimple", model1=a, model2=inpaint, ratio=0.25)[0])
    wi = state(inpaint.unet)
    torch.testing.assert_close(got["conv_in.weight"], 0.25 * wa["conv_in.weight"])
    assert_states({k: v for k, v in got.items() if k != "conv_in.weight"},
                  {k: 0.25 * wa[k] + 0.75 * wi[k] for k in wa if k != "conv_in.weight"}, atol=1e-6)
    # Add keeps it whole (model1's share is 1)
    added = merged_unet(run(engine, "ModelMergeAdd", model1=a, model2=inpaint)[0])
    assert torch.equal(added["conv_in.weight"], wa["conv_in.weight"])


def test_clip_merges(engine: EngineState, sd1: tuple) -> None:
    (_, ca, _), (_, cb, _), _, _ = sd1
    ta, tb = state(ca.encoders[0].model), state(cb.encoders[0].model)

    def weights(clip: Any) -> dict[str, torch.Tensor]:
        with patched(clip.parts(), list(clip.patches)):
            return state(clip.encoders[0].model)

    half = run(engine, "CLIPMergeSimple", clip1=ca, clip2=cb, ratio=0.5)[0]
    assert_states(weights(half), {k: (ta[k] + tb[k]) / 2 for k in ta}, atol=1e-6)
    assert run(engine, "CLIPMergeSimple", clip1=ca, clip2=cb, ratio=1.0)[0] is ca
    assert_states(weights(run(engine, "CLIPMergeAdd", clip1=ca, clip2=cb)[0]), {k: ta[k] + tb[k] for k in ta},
                  atol=1e-6)
    sub = run(engine, "CLIPMergeSubtract", clip1=ca, clip2=cb, multiplier=0.5)[0]
    assert_states(weights(sub), {k: 0.5 * (ta[k] - tb[k]) for k in ta}, atol=1e-6)
    # the encoding follows the merged weights, and the cached CLIP encodes as before afterwards
    plain = run(engine, "CLIPTextEncode", clip=ca, text="a red house")[0][0][0]
    merged = run(engine, "CLIPTextEncode", clip=half, text="a red house")[0][0][0]
    assert not torch.allclose(plain, merged)
    assert torch.equal(run(engine, "CLIPTextEncode", clip=ca, text="a red house")[0][0][0], plain)
    assert_states(state(ca.encoders[0].model), ta)


def txt2img(ckpt: str) -> dict:
    data = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = ckpt
    data["5"]["inputs"].update(width=64, height=64)
    data["3"]["inputs"].update(steps=3, seed=5, scheduler="simple")
    return data


def with_merge(data: dict, ratio: float) -> dict:
    """``data`` sampling ModelMergeSimple(its checkpoint, the second SD1.x model) instead of the checkpoint."""
    data = json.loads(json.dumps(data))
    data["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD1_B}}
    data["21"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["20", 0],
                                                               "ratio": ratio}}
    data["3"]["inputs"]["model"] = ["21", 0]
    return data


def image(ex: Executor, data: dict) -> np.ndarray:
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()


@pytest.mark.slow
def test_sampling_a_merge_leaves_the_cached_model_unchanged_and_a_saved_merge_samples_the_same(
        engine: EngineState, root: Path) -> None:
    ex = Executor(engine)
    before = image(ex, txt2img(TINY))
    merged_data = with_merge(txt2img(TINY), 0.5)
    merged = image(ex, merged_data)
    assert np.abs(merged - before).max() > 1e-3
    # the plain workflow again: its nodes are cached, so rerun it on a fresh executor sharing the model cache
    assert np.array_equal(image(Executor(engine), txt2img(TINY)), before)
    # CheckpointSave of the merge, loaded back by the checkpoint loader, gives the merged image
    save = json.loads(json.dumps(merged_data))
    save["30"] = {"class_type": "CheckpointSave", "inputs": {"model": ["21", 0], "clip": ["4", 1], "vae": ["4", 2],
                                                            "filename_prefix": "checkpoints/merged"}}
    ex.run(save, Hooks(), lambda: False)
    written = engine.output_dir / "checkpoints" / "merged_00001_.safetensors"
    assert written.is_file()
    os.link(written, root / "checkpoints" / "saved-merge.safetensors")
    assert np.allclose(image(Executor(engine), txt2img("saved-merge.safetensors")), merged, atol=1e-5)


def test_checkpoint_save_round_trip_sd1(engine: EngineState, sd1: tuple, tmp_path: Path) -> None:
    (a, ca, va), (b, cb, _), wa, wb = sd1
    model = run(engine, "ModelMergeSimple", model1=a, model2=b, ratio=0.5)[0]
    clip = run(engine, "CLIPMergeSimple", clip1=ca, clip2=cb, ratio=0.5)[0]
    workflow = {"1": {"class_type": "CheckpointSave", "inputs": {"filename_prefix": "checkpoints/ComfyUI"}}}
    result = implementations()["CheckpointSave"](ctx(engine, workflow), model=model, clip=clip, vae=va,
                                                 filename_prefix="mine/sd1")
    path = Path(result.files[0])
    assert path == engine.output_dir / "mine" / "sd1_00001_.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert json.loads(meta["prompt"]) == workflow and "nodes" in json.loads(meta["workflow"])
    assert meta["modelspec.predict_key"] == "epsilon" and "modelspec.architecture" not in meta  # as ComfyUI
    assert {k.split(".")[0] for k in keys} == {"model", "cond_stage_model", "first_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys

    back = load_checkpoint(path, CPU, tmp_path / "cfg")
    assert back.model.family is a.family
    assert_states(state(back.model.unet), {k: (wa[k] + wb[k]) / 2 for k in wa}, atol=1e-6)
    with patched(clip.parts(), list(clip.patches)):
        want_text = state(clip.encoders[0].model)
    assert_states(state(back.clip.encoders[0].model), want_text)
    assert_states(state(back.vae.vae), state(va.vae))
    # a second save takes the next counter, never the first file's name
    again = implementations()["CheckpointSave"](ctx(engine), model=a, clip=ca, vae=va, filename_prefix="mine/sd1")
    assert Path(again.files[0]).name == "sd1_00002_.safetensors"


def test_checkpoint_save_round_trip_sdxl(engine: EngineState, tmp_path: Path) -> None:
    a, ca, va = loaded(engine, TINY_XL)
    b, cb, _ = loaded(engine, XL_B)
    model = run(engine, "ModelMergeSDXL", model1=a, model2=b, **({n: 0.5 for n in SDXL_BLOCKS} | {"out.": 0.0}))[0]
    clip = run(engine, "CLIPMergeAdd", clip1=ca, clip2=cb)[0]
    path = Path(implementations()["CheckpointSave"](ctx(engine), model=model, clip=clip, vae=va,
                                                    filename_prefix="checkpoints/xl").files[0])
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == "xl 1" and meta["modelspec.implementation"] == "sgm"
    assert {k.split(".")[0] for k in keys} == {"model", "conditioner", "first_stage_model"}
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)

    back = load_checkpoint(path, CPU, tmp_path / "cfg")
    assert back.model.family is a.family
    assert_states(state(back.model.unet), merged_unet(model), atol=1e-6)
    with patched(clip.parts(), list(clip.patches)):
        want = [state(e.model) for e in clip.encoders]
    for encoder, expected in zip(back.clip.encoders, want, strict=True):
        assert_states(state(encoder.model), expected, atol=1e-6)
    assert_states(state(back.vae.vae), state(va.vae))
    # the same prompt encodes the same through the saved CLIP as through the merged one
    text = "a castle"
    saved = run(engine, "CLIPTextEncode", clip=back.clip, text=text)[0][0]
    live = run(engine, "CLIPTextEncode", clip=clip, text=text)[0][0]
    torch.testing.assert_close(saved[0], live[0])
    torch.testing.assert_close(saved[1]["pooled_output"], live[1]["pooled_output"])


@pytest.mark.parametrize("prefix", ["../outside", "/tmp/absolute", "", "checkpoints/"])
def test_a_bad_filename_prefix_is_refused_with_a_clear_message(engine: EngineState, sd1: tuple,
                                                               prefix: str) -> None:
    (a, ca, va), *_ = sd1
    data = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
            "9": {"class_type": "CheckpointSave", "inputs": {"model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2],
                                                            "filename_prefix": prefix}}}
    issues = [str(i) for i in validate_workflow(Workflow.from_data(data))]
    assert any("filename_prefix" in i for i in issues), issues
    with pytest.raises(NodeError, match="filename_prefix") as err:
        implementations()["CheckpointSave"](ctx(engine), model=a, clip=ca, vae=va, filename_prefix=prefix)
    assert "Traceback" not in str(err.value)
    assert not list(engine.output_dir.parent.glob("**/*.tmp.safetensors"))


def test_checkpoint_save_refuses_a_clip_of_another_family(engine: EngineState, sd1: tuple) -> None:
    (a, _, va), *_ = sd1
    xl_clip = loaded(engine, TINY_XL)[1]
    with pytest.raises(NodeError, match="clip: a CLIP with 2 text encoder"):
        implementations()["CheckpointSave"](ctx(engine), model=a, clip=xl_clip, vae=va, filename_prefix="x")


def test_checkpoint_save_of_a_v_prediction_model_marks_it_and_loads_back_as_one(engine: EngineState,
                                                                               tmp_path: Path) -> None:
    """SD2.x (OpenCLIP text tower): ComfyUI's v_pred marker and predict_key; the text encoder keeps its layers."""
    model, clip, vae = loaded(engine, TINY_SD2_V)
    assert model.model_sampling.prediction == "v"
    path = Path(implementations()["CheckpointSave"](ctx(engine), model=model, clip=clip, vae=vae,
                                                    filename_prefix="sd2/v").files[0])
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "v_pred" in keys and meta["modelspec.predict_key"] == "v" and "ztsnr" not in keys
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys)
    back = load_checkpoint(path, CPU, tmp_path / "cfg")
    assert back.model.family is model.family and back.model.model_sampling.prediction == "v"
    assert_states(state(back.model.unet), state(model.unet))
    assert_states(state(back.clip.encoders[0].model), state(clip.encoders[0].model))


def test_flux_transformers_merge_with_the_first_ratio_and_are_not_saved_with_an_sd1_vae(engine: EngineState,
                                                                                       sd1: tuple) -> None:
    """No Flux weight has a UNet block name, so ModelMergeBlocks gives every one the first input's ratio, as
    ComfyUI's prefix rule does; CheckpointSave refuses to put an SD1.x VAE beside it (tests/test_checkpoint_save_dit.py
    saves Flux models)."""
    from tui_diffusion.families import by_id
    from tui_diffusion.pipeline.checkpoint_writer_dit import build_flux_transformer
    from tui_diffusion.pipeline.models import ModelHandle

    (_, clip, vae), *_ = sd1
    a, b = (ModelHandle(build_flux_transformer(seed=s), {}, by_id("flux"), CPU, "flux") for s in (0, 1))
    wa, wb = state(a.unet), state(b.unet)
    got = merged_unet(run(engine, "ModelMergeBlocks", model1=a, model2=b, input=0.25, middle=1.0, out=0.0)[0])
    assert_states(got, {k: 0.25 * wa[k] + 0.75 * wb[k] for k in wa}, atol=1e-6)
    with pytest.raises(NodeError, match="vae: a VAE with 4 latent channels, but a Flux.1 model works in 16"):
        implementations()["CheckpointSave"](ctx(engine), model=a, clip=clip, vae=vae, filename_prefix="flux")

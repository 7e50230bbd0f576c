"""GLIGEN: ComfyUI-layout files into diffusers' GLIGEN parts, boxes as ComfyUI computes them, the attached UNet
against diffusers' own gated UNet, and GLIGENLoader + GLIGENTextBoxApply + KSampler through the executor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, txt2img
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import unet_original_key
from tui_diffusion.pipeline.checkpoint_writer_gligen import gligen_state_dict, write_gligen
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.gligen import GligenBoxes, attached, box_tensors, load_gligen, with_gligen
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
OPEN, CLOSED, OTHER = "gligen-open.safetensors", "gligen-closed.safetensors", "gligen-deeper.safetensors"


@pytest.fixture(scope="module")
def root(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints and GLIGEN files made for the tiny SD1.x UNet (gates open and closed) and SDXL's."""
    from tui_diffusion.pipeline.checkpoint_writer import TinySD1, build_sd1_models

    root = tmp_path_factory.mktemp("gligen-models")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / TINY).symlink_to(models_dir / "checkpoints" / TINY)
    unet = build_sd1_models(TinySD1(), seed=0)[0]
    write_gligen(root / "gligen" / OPEN, gligen_state_dict(unet, 64, seed=1, gates=(0.8, 0.5)))
    write_gligen(root / "gligen" / CLOSED, gligen_state_dict(unet, 64, seed=1, gates=(0.0, 0.0)))
    # a GLIGEN of a deeper UNet: its first fuser belongs to a block the tiny UNet does not have
    other = {k.replace("input_blocks.1.1.", "input_blocks.4.1."): v
             for k, v in gligen_state_dict(unet, 64, seed=2).items()}
    write_gligen(root / "gligen" / OTHER, other)
    return root


@pytest.fixture(scope="module")
def engine(root: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineState:
    tmp = tmp_path_factory.mktemp("gligen-engine")
    return EngineState(CPU, ModelCache(8), ModelPaths(root), tmp / "out", tmp / "tmp", tmp / "cfg")


@pytest.fixture(scope="module")
def executor(engine: EngineState) -> Executor:
    return Executor(engine)


def ctx(engine: EngineState) -> NodeContext:
    return NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)


def run(engine: EngineState, class_type: str, **inputs: object) -> tuple:
    return implementations()[class_type](ctx(engine), **inputs).outputs


SD1 = {"3.seed": 3, "3.steps": 4, "3.cfg": 7.0, "3.scheduler": "simple", "6.text": "a red ball on grass",
       "7.text": "blurry"}


def boxed(data: dict, *boxes: tuple[str, int, int, int, int], gligen: str = OPEN) -> dict:
    """``data`` with GLIGENTextBoxApply nodes chained on the positive: (phrase, width, height, x, y) in pixels."""
    data = json.loads(json.dumps(data))
    data["10"] = {"class_type": "GLIGENLoader", "inputs": {"gligen_name": gligen}}
    pos = ["6", 0]
    for i, (text, w, h, x, y) in enumerate(boxes):
        data[str(11 + i)] = {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": pos, "clip": ["4", 1], "gligen_textbox_model": ["10", 0], "text": text,
            "width": w, "height": h, "x": x, "y": y}}
        pos = [str(11 + i), 0]
    data["3"]["inputs"]["positive"] = pos
    return data


def decoded(ex: Executor, data: dict) -> np.ndarray:
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()


def unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# -- the file ---------------------------------------------------------------------------------------------------
def test_file_loads_into_diffusers_parts_tensor_for_tensor(root: Path, engine: EngineState) -> None:
    from safetensors.torch import load_file

    state = load_file(str(root / "gligen" / OPEN))
    gligen = load_gligen(root / "gligen" / OPEN)
    model = run(engine, "CheckpointLoaderSimple", ckpt_name=TINY)[0]
    names = {unet_original_key(n + ".norm1.weight", 1).removesuffix(".norm1.weight")
             for n, _ in model.unet.named_modules() if n.endswith("transformer_blocks.0")}
    assert set(gligen.fusers) == names == {"input_blocks.1.1.transformer_blocks.0",
                                            "middle_block.1.transformer_blocks.0",
                                            "output_blocks.2.1.transformer_blocks.0",
                                            "output_blocks.3.1.transformer_blocks.0"}
    for name, fuser in gligen.fusers.items():
        for k, v in fuser.state_dict().items():
            assert torch.equal(v, state[f"{name}.fuser.{k}"]), (name, k)
    for k, v in gligen.position_net.state_dict().items():
        assert torch.equal(v, state[f"position_net.{k}"]), k
    assert gligen.text_width == 64


def test_prefixed_and_pickled_files_load_the_same_and_pickles_need_allowing(root: Path, tmp_path: Path) -> None:
    from tui_diffusion.modelfiles.header import CheckpointError
    from tui_diffusion.pipeline.checkpoint_writer import TinySD1, build_sd1_models

    unet = build_sd1_models(TinySD1(), seed=0)[0]
    state = gligen_state_dict(unet, 64, seed=1, gates=(0.8, 0.5), prefix="model.diffusion_model.")
    write_gligen(tmp_path / "prefixed.safetensors", state)
    write_gligen(tmp_path / "pickled.pt", state)
    plain = load_gligen(root / "gligen" / OPEN)
    for other in (load_gligen(tmp_path / "prefixed.safetensors"), load_gligen(tmp_path / "pickled.pt", True)):
        assert set(other.fusers) == set(plain.fusers)
        a, b = other.fusers["middle_block.1.transformer_blocks.0"], plain.fusers["middle_block.1.transformer_blocks.0"]
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(CheckpointError, match="pickle.*--allow-pickle"):
        load_gligen(tmp_path / "pickled.pt")


def test_a_file_that_is_not_gligen_says_so(tmp_path: Path, engine: EngineState, root: Path) -> None:
    from safetensors.torch import save_file

    save_file({"input_blocks.1.1.proj_in.weight": torch.zeros(2, 2)}, str(root / "gligen" / "not-gligen.safetensors"))
    with pytest.raises(NodeError, match="not-gligen.safetensors: not a GLIGEN text-box model"):
        run(engine, "GLIGENLoader", gligen_name="not-gligen.safetensors")


# -- the boxes --------------------------------------------------------------------------------------------------
def test_boxes_in_pixels_become_comfyuis_latent_boxes(engine: EngineState) -> None:
    """ComfyUI keeps (pooled phrase, h // 8, w // 8, y // 8, x // 8) and divides by the latent's size; a second box
    is appended to the first; more than 30 is an error."""
    from tui_diffusion.pipeline.nodes import encode_text

    _, clip, _ = run(engine, "CheckpointLoaderSimple", ckpt_name=TINY)
    gligen = run(engine, "GLIGENLoader", gligen_name=OPEN)[0]
    cond = run(engine, "CLIPTextEncode", text="a red ball", clip=clip)[0]
    one = run(engine, "GLIGENTextBoxApply", conditioning_to=cond, clip=clip, gligen_textbox_model=gligen,
              text="a red ball", width=30, height=44, x=12, y=17)[0]
    two = run(engine, "GLIGENTextBoxApply", conditioning_to=one, clip=clip, gligen_textbox_model=gligen,
              text="a tree", width=64, height=64, x=0, y=0)[0]
    boxes = two[0][1]["gligen"]
    assert isinstance(boxes, GligenBoxes) and boxes.model is gligen
    assert [b[1:] for b in boxes.boxes] == [(5, 3, 2, 1), (8, 8, 0, 0)]
    torch.testing.assert_close(boxes.boxes[0][0], encode_text(clip, "a red ball")[1], rtol=0, atol=0)
    assert "gligen" not in cond[0][1]  # the input conditioning is not changed
    xyxy, masks, phrases = box_tensors(boxes, (8, 16))
    torch.testing.assert_close(xyxy[:2], torch.tensor([[1 / 16, 2 / 8, 4 / 16, 7 / 8], [0, 0, 8 / 16, 1]]))
    assert masks.tolist() == [1.0, 1.0] + [0.0] * 28 and xyxy[2:].abs().sum() == 0
    assert phrases.shape == (30, 64) and torch.equal(phrases[1], boxes.boxes[1][0][0])
    many = two
    for _ in range(28):
        many = run(engine, "GLIGENTextBoxApply", conditioning_to=many, clip=clip, gligen_textbox_model=gligen,
                   text="x", width=8, height=8, x=0, y=0)[0]
    with pytest.raises(NodeError, match="at most 30"):
        run(engine, "GLIGENTextBoxApply", conditioning_to=many, clip=clip, gligen_textbox_model=gligen, text="x",
            width=8, height=8, x=0, y=0)


# -- the UNet ---------------------------------------------------------------------------------------------------
def test_attached_unet_equals_diffusers_gated_unet_and_rows_without_boxes_the_plain_one(engine: EngineState) -> None:
    """Rows of an entry with boxes: diffusers' UNet2DConditionModel(attention_type="gated") holding the same
    weights, fed the same boxes; rows of an entry without boxes (the negative): the plain UNet."""
    from diffusers import UNet2DConditionModel

    model, clip, _ = run(engine, "CheckpointLoaderSimple", ckpt_name=TINY)
    gligen = run(engine, "GLIGENLoader", gligen_name=OPEN)[0]
    cond = run(engine, "CLIPTextEncode", text="a ball", clip=clip)[0]
    boxed_cond = run(engine, "GLIGENTextBoxApply", conditioning_to=cond, clip=clip, gligen_textbox_model=gligen,
                     text="a ball", width=32, height=24, x=16, y=8)[0]
    boxed_cond = run(engine, "GLIGENTextBoxApply", conditioning_to=boxed_cond, clip=clip,
                     gligen_textbox_model=gligen, text="a cat", width=16, height=40, x=0, y=24)[0]
    entries = [cond[0], boxed_cond[0]]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500.0, 500.0])
    context = torch.cat([cond[0][0], boxed_cond[0][0]])
    unet = model.unet
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        kwargs = {"encoder_hidden_states": context}
        with_gligen(kwargs, entries, (8, 8), 1, torch.device("cpu"), torch.float32)
        with attached(model, entries):
            ours = unet(x, t, **kwargs).sample

        gated = UNet2DConditionModel.from_config(unet.config, attention_type="gated").eval()
        names = {unet_original_key(n + ".norm1.weight", 1).removesuffix(".norm1.weight"): n
                 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0")}
        state = dict(unet.state_dict())
        for name, fuser in gligen.fusers.items():
            state.update({f"{names[name]}.fuser.{k}": v for k, v in fuser.state_dict().items()})
        state.update({f"position_net.{k}": v for k, v in gligen.position_net.state_dict().items()})
        gated.load_state_dict(state)
        xyxy, masks, phrases = box_tensors(boxed_cond[0][1]["gligen"], (8, 8))
        theirs = gated(x[1:], t[1:], encoder_hidden_states=context[1:], cross_attention_kwargs={"gligen": {
            "boxes": xyxy[None], "masks": masks[None], "positive_embeddings": phrases[None]}}).sample
    torch.testing.assert_close(ours[1:], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:1], plain[:1], rtol=0, atol=0)
    assert (ours[1:] - plain[1:]).abs().max() > 1e-2  # the boxes changed the boxed row


def test_a_gligen_model_for_another_unet_is_a_clear_error(engine: EngineState) -> None:
    model, clip, _ = run(engine, "CheckpointLoaderSimple", ckpt_name=TINY)
    other = run(engine, "GLIGENLoader", gligen_name=OTHER)[0]
    cond = run(engine, "CLIPTextEncode", text="a ball", clip=clip)[0]
    applied = run(engine, "GLIGENTextBoxApply", conditioning_to=cond, clip=clip, gligen_textbox_model=other,
                  text="a ball", width=32, height=32, x=0, y=0)[0]
    with pytest.raises(NodeError, match=f"{OTHER}: does not fit this SD1.x model"), attached(model, applied):
        pass
    assert "position_net" not in model.unet._modules


# -- sampling ---------------------------------------------------------------------------------------------------
def test_workflow_with_gligen_runs_end_to_end_and_leaves_the_cached_unet_as_it_was(engine: EngineState,
                                                                                  executor: Executor,
                                                                                  root: Path) -> None:
    """GLIGENLoader + GLIGENTextBoxApply + KSampler validate and run; closed gates (tanh(0) = 0) give the plain
    image exactly, open gates another one, and a moved box another again; the UNet keeps no GLIGEN part."""
    data = boxed(txt2img(**SD1), ("a red ball", 32, 32, 0, 0))
    assert validate_workflow(Workflow.from_data(data), ModelPaths(root)) == []
    model = run(engine, "CheckpointLoaderSimple", ckpt_name=TINY)[0]
    before = unet_state(model.unet)
    plain = decoded(executor, txt2img(**SD1))
    ours = decoded(executor, data)
    assert np.abs(ours - plain).max() > 1e-2
    moved = decoded(executor, boxed(txt2img(**SD1), ("a red ball", 32, 32, 32, 32)))
    assert np.abs(moved - ours).max() > 1e-3
    closed = decoded(executor, boxed(txt2img(**SD1), ("a red ball", 32, 32, 0, 0), gligen=CLOSED))
    np.testing.assert_array_equal(closed, plain)
    after = unet_state(model.unet)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert "position_net" not in model.unet._modules
    assert not any("fuser" in m._modules for m in model.unet.modules())


def test_pickled_gligen_is_refused_without_allow_pickle(executor: Executor, root: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(root / "gligen" / OPEN)), root / "gligen" / "gligen.pth")
    with pytest.raises(JobError, match="pickle"):
        executor.run(boxed(txt2img(**SD1), ("a ball", 32, 32, 0, 0), gligen="gligen.pth"), Hooks(), lambda: False)


def test_boxes_on_an_area_conditioning_are_sampled_on_its_crop(executor: Executor) -> None:
    """An area entry runs the UNet on its crop (the Denoiser's area path), and its boxes apply there too."""
    def area(data: dict) -> dict:
        data["20"] = {"class_type": "ConditioningSetArea", "inputs": {
            "conditioning": data["3"]["inputs"]["positive"], "width": 64, "height": 64, "x": 64, "y": 0,
            "strength": 1.0}}
        data["21"] = {"class_type": "ConditioningCombine", "inputs": {
            "conditioning_1": ["6", 0], "conditioning_2": ["20", 0]}}
        data["3"]["inputs"]["positive"] = ["21", 0]
        return data

    wide = {**SD1, "5.width": 128, "3.steps": 2}
    plain = decoded(executor, area(txt2img(**wide)))
    ours = decoded(executor, area(boxed(txt2img(**wide), ("a red ball", 16, 16, 8, 8))))
    assert np.abs(ours - plain).max() > 1e-3

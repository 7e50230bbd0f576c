"""ControlNets and T2I-Adapters: files in their published layouts, the nodes, and images against diffusers'
ControlNet and T2I-Adapter pipelines on the same weights, noise and sigmas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY, TINY_XL, txt2img
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.checkpoint_writer import TinySD1, TinySDXL, build_sd1_models, build_sdxl_models
from tui_diffusion.pipeline.checkpoint_writer_controlnet import (
    build_controlnet,
    build_t2i_adapter,
    write_controlnet,
    write_t2i_adapter,
)
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.controlnet import Control, control_inputs, load_control
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, Hooks, JobError, execution_order
from tui_diffusion.pipeline.ksampler import Denoiser
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.pipeline.sampling import noise_for
from tui_diffusion.pipeline.schedules import ksampler_sigmas
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
CN, CN_B, CN_XL, T2I, DIFF = "cn-sd15.safetensors", "cn-sd15-b.safetensors", "cn-sdxl.safetensors", \
    "t2i-sd15.safetensors", "diff-cn-sd15.safetensors"


@pytest.fixture(scope="module")
def nets() -> dict:
    """The random networks written to the files (the tiny checkpoints' UNets as their architecture)."""
    unet = build_sd1_models(TinySD1(), seed=0)[0]
    xl = build_sdxl_models(TinySDXL(), seed=0)[0]
    return {"unet": unet, "cn": build_controlnet(unet, seed=3), "cn_b": build_controlnet(unet, seed=4),
            "cn_xl": build_controlnet(xl, seed=5), "t2i": build_t2i_adapter((32, 64), seed=6)}


@pytest.fixture(scope="module")
def root(models_dir: Path, nets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: the tiny checkpoints, ControlNets in controlnet/, the adapter in t2i_adapter/, a hint."""
    root = tmp_path_factory.mktemp("cn-models")
    (root / "checkpoints").mkdir()
    for name in (TINY, TINY_XL):
        (root / "checkpoints" / name).symlink_to(models_dir / "checkpoints" / name)
    write_controlnet(root / "controlnet" / CN, nets["cn"])  # lllyasviel's control_model.* layout
    write_controlnet(root / "controlnet" / CN_B, nets["cn_b"])
    write_controlnet(root / "controlnet" / CN_XL, nets["cn_xl"], layout="diffusers")  # as most SDXL ones are
    write_controlnet(root / "controlnet" / DIFF, nets["cn"], difference_to=nets["unet"])
    write_t2i_adapter(root / "t2i_adapter" / T2I, nets["t2i"])  # TencentARC's layout, ComfyUI's second folder
    (root / "input").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "input" / "hint.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "input" / "hint2.png")
    return root


@pytest.fixture(scope="module")
def engine(root: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineState:
    """One engine for the module: the checkpoints and ControlNets load once (a run on 2 cores is minutes)."""
    tmp = tmp_path_factory.mktemp("cn-engine")
    return EngineState(CPU, ModelCache(8), ModelPaths(root, input_dir=root / "input"), tmp / "out", tmp / "tmp",
                       tmp / "cfg")


@pytest.fixture(scope="module")
def executor(engine: EngineState) -> Executor:
    """One executor: a node whose inputs did not change (the loaders, the uncontrolled image) runs once."""
    return Executor(engine)


def checkpoint(engine: EngineState, name: str) -> tuple:
    """MODEL, CLIP, VAE of a checkpoint through the node (from the module's model cache)."""
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    return implementations()["CheckpointLoaderSimple"](ctx, ckpt_name=name).outputs


def hint_tensor(root: Path, name: str = "hint.png") -> torch.Tensor:
    """The hint as LoadImage gives it, channels first: [1, 3, 64, 64] in 0..1."""
    return torch.from_numpy(np.asarray(Image.open(root / "input" / name).convert("RGB"))).float().div(255)[None] \
        .movedim(-1, 1)


def controlled(data: dict, *applies: tuple[str, float, float, float], old: bool = False) -> dict:
    """``data`` (a txt2img-shaped workflow) with ControlNets applied in a chain: (file, strength, start, end)."""
    data = json.loads(json.dumps(data))
    data["20"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    pos, neg = ["6", 0], ["7", 0]
    for i, (name, strength, start, end) in enumerate(applies):
        loader, apply = str(30 + 2 * i), str(31 + 2 * i)
        data[loader] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
        if old:
            data[apply] = {"class_type": "ControlNetApply", "inputs": {
                "conditioning": pos, "control_net": [loader, 0], "image": ["20", 0], "strength": strength}}
            pos = [apply, 0]
        else:
            data[apply] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": pos, "negative": neg, "control_net": [loader, 0], "image": ["20", 0],
                "strength": strength, "start_percent": start, "end_percent": end}}
            pos, neg = [apply, 0], [apply, 1]
    data["3"]["inputs"]["positive"], data["3"]["inputs"]["negative"] = pos, neg
    return data


def decoded(ex: Executor, data: dict) -> np.ndarray:
    ex.run(data, Hooks(), lambda: False)
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))["8"]].outputs[0][0].numpy()


SD1 = {"3.seed": 11, "3.steps": 4, "3.cfg": 7.5, "3.sampler_name": "euler", "3.scheduler": "simple",
       "6.text": "a red fox in snow", "7.text": "blurry"}


def _latents(model_sampling: DiscreteSampling, sched: object, seed: int, steps: int) -> torch.Tensor:
    sigmas = ksampler_sigmas(model_sampling, "euler", "simple", steps, 1.0)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == [float(t) for t in model_sampling.timestep(sigmas[:-1])]
    s0 = float(sigmas[0])
    return noise_for(seed, (1, 4, 8, 8)) * (1 + s0 * s0) ** 0.5 / float(sched.init_noise_sigma)


# -- files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "key"), [(CN, "cn"), (CN_XL, "cn_xl"), (T2I, "t2i")])
def test_files_load_back_tensor_for_tensor(root: Path, nets: dict, name: str, key: str) -> None:
    folder = "t2i_adapter" if name == T2I else "controlnet"
    loaded = load_control(root / folder / name, CPU)
    ours, theirs = nets[key].state_dict(), loaded.net.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.label == ("SDXL" if key == "cn_xl" else "SD1.x")


def test_original_layouts_load_as_diffusers_own_single_file_loader_reads_them(root: Path, nets: dict,
                                                                                tmp_path: Path) -> None:
    """The writer's original layout is the one diffusers' from_single_file converts (an independent reader),
    with and without the ``control_model.`` prefix; an SDXL ControlNet in the original layout loads too."""
    from diffusers import ControlNetModel

    (tmp_path / "config.json").write_text(json.dumps(dict(nets["cn"].config)))
    theirs = ControlNetModel.from_single_file(str(root / "controlnet" / CN), config=str(tmp_path),
                                              local_files_only=True).state_dict()
    ours = nets["cn"].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    from safetensors.torch import load_file, save_file

    bare = {k.removeprefix("control_model."): v for k, v in load_file(str(root / "controlnet" / CN)).items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    loaded = load_control(tmp_path / "bare.safetensors", CPU).net.state_dict()
    assert all(torch.equal(ours[k], loaded[k]) for k in ours)
    write_controlnet(tmp_path / "xl.safetensors", nets["cn_xl"])
    xl, loaded_xl = nets["cn_xl"].state_dict(), load_control(tmp_path / "xl.safetensors", CPU).net.state_dict()
    assert all(torch.equal(xl[k], loaded_xl[k]) for k in xl)


def test_diff_controlnet_adds_the_models_weights(engine: EngineState, root: Path, nets: dict) -> None:
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    model = implementations()["CheckpointLoaderSimple"](ctx, ckpt_name=TINY).outputs[0]
    diff = implementations()["DiffControlNetLoader"](ctx, model=model, control_net_name=DIFF).outputs[0]
    ours, theirs = nets["cn"].state_dict(), diff.net.state_dict()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-6)
    alone = implementations()["ControlNetLoader"](ctx, control_net_name=DIFF).outputs[0].net.state_dict()
    assert not torch.allclose(alone["conv_in.weight"], ours["conv_in.weight"])  # the difference, not the net


@pytest.mark.parametrize(("keys", "why"), [
    ({"transformer_blocks.0.attn.to_q.weight": (8, 8), "pos_embed_input.proj.weight": (8, 16, 2, 2),
      "controlnet_blocks.0.weight": (8, 8)}, "incomplete ControlNet: tensor 'pos_embed.proj.weight' is missing"),
    ({"control_type": (1,), "transformer_blocks.0.adaLN_modulation.1.weight": (48, 8),
      "y_embedder.mlp.0.weight": (8, 16)}, "incomplete SD3/SD3.5 ControlNet: no 'pos_embed_input.proj.weight'"),
    ({"double_blocks.0.img_attn.qkv.weight": (24, 8), "controlnet_blocks.0.weight": (8, 8)},
     "incomplete ControlNet: tensor 'img_in.weight' is missing"),
    ({"double_blocks.0.img_attn.qkv.weight": (24, 8)}, "Flux ControlNet in an unknown layout"),
    ({"controlnet_blocks.0.linear.weight": (8, 8)}, "MistoLine's layout is not supported"),
    ({"lora_controlnet": (1,), "input_hint_block.0.weight": (16, 3, 3, 3)}, "Control-LoRA"),
    ({"control_add_embedding.linear_1.weight": (8, 8), "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)},
     "union ControlNet"),
    ({"some.other.weight": (2, 2)}, "neither a ControlNet nor a T2I-Adapter"),
])
def test_files_that_cannot_load_say_why(engine: EngineState, root: Path, keys: dict, why: str) -> None:
    from safetensors.torch import save_file

    name = "refused-" + "".join(c for c in why.split()[0].lower() if c.isalnum()) + ".safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(root / "controlnet" / name))
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    with pytest.raises(NodeError, match=why):
        implementations()["ControlNetLoader"](ctx, control_net_name=name)


def test_pickle_controlnets_are_refused_without_allow_pickle(executor: Executor, root: Path, nets: dict) -> None:
    torch.save(nets["cn"].state_dict(), root / "controlnet" / "cn.pth")
    data = controlled(txt2img(**SD1), ("cn.pth", 1.0, 0.0, 1.0))
    with pytest.raises(JobError, match="pickle"):
        executor.run(data, Hooks(), lambda: False)


# -- images against diffusers ---------------------------------------------------------------------------------
def test_sd1_controlnet_matches_diffusers_controlnet_pipeline(engine: EngineState, executor: Executor,
                                                              root: Path) -> None:
    """ControlNetApplyAdvanced on both sides, strength 0.8: the image of StableDiffusionControlNetPipeline; the
    old ControlNetApply on the positive alone gives the same image (ComfyUI gives its control to the negative)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    ours = decoded(executor, controlled(txt2img(**SD1), (CN, 0.8, 0.0, 1.0)))
    old = decoded(executor, controlled(txt2img(**SD1), (CN, 0.8, 0.0, 1.0), old=True))
    plain = decoded(executor, txt2img(**SD1))
    model, clip, vae = checkpoint(engine, TINY)
    sched = EulerDiscreteScheduler.from_config(model.scheduler_config, timestep_spacing="trailing")
    enc = clip.encoders[0]
    pipe = StableDiffusionControlNetPipeline(
        vae=vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer, unet=model.unet,
        controlnet=load_control(root / "controlnet" / CN, CPU).net, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(DiscreteSampling.from_scheduler_config(model.scheduler_config), sched, 11, 4)
    image = pipe(prompt="a red fox in snow", negative_prompt="blurry", image=hint_tensor(root), height=64, width=64,
                 num_inference_steps=4, guidance_scale=7.5, latents=latents, controlnet_conditioning_scale=0.8,
                 output_type="np").images[0]
    np.testing.assert_allclose(ours, image, atol=3e-4)
    np.testing.assert_allclose(old, ours, atol=1e-5)
    assert np.abs(ours - plain).max() > 0.05  # the ControlNet changed the image


def test_sdxl_controlnet_matches_diffusers_sdxl_controlnet_pipeline(engine: EngineState, executor: Executor,
                                                                    root: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    data = json.loads((ROOT / "workflows" / "sdxl.json").read_text())
    settings = {"4.ckpt_name": TINY_XL, "5.width": 64, "5.height": 64, "3.steps": 4, "3.seed": 5, "3.cfg": 7.0,
                "3.sampler_name": "euler", "3.scheduler": "simple", "6.text": "a castle on a hill", "7.text": "fog"}
    for target, value in settings.items():
        node_id, key = target.split(".", 1)
        data[node_id]["inputs"][key] = value
    ours = decoded(executor, controlled(data, (CN_XL, 1.0, 0.0, 1.0)))
    plain = decoded(executor, data)
    model, clip, vae = checkpoint(engine, TINY_XL)
    sched = EulerDiscreteScheduler.from_config(model.scheduler_config, timestep_spacing="trailing")
    (l_enc, g_enc) = clip.encoders
    pipe = StableDiffusionXLControlNetPipeline(
        vae=vae.vae, text_encoder=l_enc.model, text_encoder_2=g_enc.model, tokenizer=l_enc.tokenizer,
        tokenizer_2=g_enc.tokenizer, unet=model.unet,
        controlnet=load_control(root / "controlnet" / CN_XL, CPU).net, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(DiscreteSampling.from_scheduler_config(model.scheduler_config), sched, 5, 4)
    image = pipe(prompt="a castle on a hill", negative_prompt="fog", image=hint_tensor(root), height=64, width=64,
                 num_inference_steps=4, guidance_scale=7.0, latents=latents, output_type="np").images[0]
    np.testing.assert_allclose(ours, image, atol=3e-4)
    assert np.abs(ours - plain).max() > 0.05


def test_t2i_adapter_matches_diffusers_adapter_pipeline(engine: EngineState, executor: Executor, root: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline

    ours = decoded(executor, controlled(txt2img(**SD1), (T2I, 0.9, 0.0, 1.0)))
    plain = decoded(executor, txt2img(**SD1))
    model, clip, vae = checkpoint(engine, TINY)
    sched = EulerDiscreteScheduler.from_config(model.scheduler_config, timestep_spacing="trailing")
    enc = clip.encoders[0]
    pipe = StableDiffusionAdapterPipeline(
        vae=vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer, unet=model.unet,
        adapter=load_control(root / "t2i_adapter" / T2I, CPU).net, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(DiscreteSampling.from_scheduler_config(model.scheduler_config), sched, 11, 4)
    image = pipe(prompt="a red fox in snow", negative_prompt="blurry", image=hint_tensor(root), height=64, width=64,
                 num_inference_steps=4, guidance_scale=7.5, latents=latents, adapter_conditioning_scale=0.9,
                 output_type="np").images[0]
    np.testing.assert_allclose(ours, image, atol=3e-4)
    assert np.abs(ours - plain).max() > 0.05


# -- strength, windows, chains --------------------------------------------------------------------------------
def test_strength_zero_is_no_controlnet(engine: EngineState) -> None:
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    cn = implementations()["ControlNetLoader"](ctx, control_net_name=CN).outputs[0]
    pos, neg = [[torch.zeros(1, 77, 64), {}]], [[torch.ones(1, 77, 64), {}]]
    out = implementations()["ControlNetApplyAdvanced"](ctx, positive=pos, negative=neg, control_net=cn,
                                                       image=torch.zeros(1, 64, 64, 3), strength=0.0).outputs
    assert out[0] is pos and out[1] is neg  # the very conditioning given: the sampler sees no control
    old = implementations()["ControlNetApply"](ctx, conditioning=pos, control_net=cn, image=torch.zeros(1, 64, 64, 3),
                                               strength=0.0).outputs
    assert old[0] is pos


def test_outside_its_window_a_controlnet_does_nothing(engine: EngineState, root: Path) -> None:
    """At a sigma outside start..end the denoiser's prediction is exactly the uncontrolled one; inside, not."""
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    impl = implementations()
    model, clip, _ = impl["CheckpointLoaderSimple"](ctx, ckpt_name=TINY).outputs
    pos = impl["CLIPTextEncode"](ctx, text="a red fox", clip=clip).outputs[0]
    neg = impl["CLIPTextEncode"](ctx, text="blurry", clip=clip).outputs[0]
    cn = impl["ControlNetLoader"](ctx, control_net_name=CN).outputs[0]
    image = hint_tensor(root).movedim(1, -1)
    cpos, cneg = impl["ControlNetApplyAdvanced"](ctx, positive=pos, negative=neg, control_net=cn, image=image,
                                                 start_percent=0.3, end_percent=0.7).outputs
    ms = model.model_sampling
    high, low = ms.percent_to_sigma(0.3), ms.percent_to_sigma(0.7)
    latent, noise = torch.zeros(1, 4, 8, 8), noise_for(3, (1, 4, 8, 8))
    plain = Denoiser(model, pos, neg, 7.5, latent, noise, None)
    control = Denoiser(model, cpos, cneg, 7.5, latent, noise, None)
    with torch.inference_mode():
        for sigma, inside in ((high * 1.2, False), ((high + low) / 2, True), (low * 0.8, False)):
            s = torch.tensor([sigma])
            x = noise * sigma
            assert torch.equal(plain(x, s), control(x, s)) != inside, sigma


def test_chained_controlnets_add_their_strength_scaled_outputs(engine: EngineState, executor: Executor,
                                                               root: Path) -> None:
    """Two ControlNets chained: the residuals are 0.7 x the first's plus 0.4 x the second's, each on its own
    hint; the positive and negative share each control (one batch); A(0.5) then A(0.5) is the image of A(1)."""
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    impl = implementations()
    model, clip, _ = impl["CheckpointLoaderSimple"](ctx, ckpt_name=TINY).outputs
    pos = impl["CLIPTextEncode"](ctx, text="a red fox", clip=clip).outputs[0]
    neg = impl["CLIPTextEncode"](ctx, text="blurry", clip=clip).outputs[0]
    a = impl["ControlNetLoader"](ctx, control_net_name=CN).outputs[0]
    b = impl["ControlNetLoader"](ctx, control_net_name=CN_B).outputs[0]
    img_a, img_b = hint_tensor(root).movedim(1, -1), hint_tensor(root, "hint2.png").movedim(1, -1)
    p1, n1 = impl["ControlNetApplyAdvanced"](ctx, positive=pos, negative=neg, control_net=a, image=img_a,
                                             strength=0.7).outputs
    p2, n2 = impl["ControlNetApplyAdvanced"](ctx, positive=p1, negative=n1, control_net=b, image=img_b,
                                             strength=0.4).outputs
    chain = p2[0][1]["control"]
    assert isinstance(chain, Control) and chain.previous is p1[0][1]["control"] and n2[0][1]["control"] is chain
    x, t = noise_for(2, (2, 4, 8, 8)), torch.tensor([500.0, 500.0])
    context = torch.cat([neg[0][0], pos[0][0]])
    sigma = float(model.model_sampling.sigma(torch.tensor(500.0)))

    def residuals(cond: list) -> tuple:
        entries = [(neg[0][0], cond[0][1]), (pos[0][0], cond[0][1])]
        with torch.inference_mode():
            out = control_inputs(model, entries, x, t, sigma, {"encoder_hidden_states": context}, 1)
        return (*out["down_block_additional_residuals"], out["mid_block_additional_residual"])

    def alone(net: object, img: torch.Tensor) -> tuple:
        return residuals(impl["ControlNetApplyAdvanced"](ctx, positive=pos, negative=neg, control_net=net,
                                                         image=img).outputs[0])

    for got, ra, rb in zip(residuals(p2), alone(a, img_a), alone(b, img_b), strict=True):
        torch.testing.assert_close(got, 0.7 * ra + 0.4 * rb, rtol=1e-4, atol=1e-5)
    twice = decoded(executor, controlled(txt2img(**SD1), (CN, 0.5, 0.0, 1.0), (CN, 0.5, 0.0, 1.0)))
    once = decoded(executor, controlled(txt2img(**SD1), (CN, 1.0, 0.0, 1.0)))
    np.testing.assert_allclose(twice, once, atol=1e-5)


# -- errors ---------------------------------------------------------------------------------------------------
def test_a_controlnet_of_another_family_is_a_clear_error(executor: Executor) -> None:
    data = json.loads((ROOT / "workflows" / "sdxl.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY_XL
    data["5"]["inputs"].update(width=64, height=64)
    data["3"]["inputs"]["steps"] = 2
    with pytest.raises(JobError, match="an SD1.x ControlNet cannot control a SDXL base model"):
        executor.run(controlled(data, (CN, 1.0, 0.0, 1.0)), Hooks(), lambda: False)
    with pytest.raises(JobError, match="SDXL T2I-Adapter|SD1.x T2I-Adapter cannot control"):
        executor.run(controlled(data, (T2I, 1.0, 0.0, 1.0)), Hooks(), lambda: False)


def test_set_union_controlnet_type(engine: EngineState) -> None:
    ctx = NodeContext(engine, "1", {}, report=lambda *a: None, interrupted=lambda: False)
    cn = implementations()["ControlNetLoader"](ctx, control_net_name=CN).outputs[0]
    assert implementations()["SetUnionControlNetType"](ctx, control_net=cn, type="auto").outputs[0] is cn
    with pytest.raises(NodeError, match="union ControlNet .* cannot load"):
        implementations()["SetUnionControlNetType"](ctx, control_net=cn, type="depth")


def test_hints_are_cropped_to_the_latents_aspect_and_cycled_over_the_batch(engine: EngineState) -> None:
    """ComfyUI's hint handling: a centre crop to the latent's aspect, nearest-exact to 8x its size; one hint serves
    every row, several are cycled over each conditioning's rows."""
    from tui_diffusion.pipeline.controlnet import ControlModel, broadcast_rows

    hint = torch.zeros(1, 3, 60, 100)
    hint[..., 5:55, :] = 1.0  # 5:3 to 2:1: the top and bottom 5 rows (all 0) are cropped away
    control = Control(ControlModel("controlnet", None, "SD1.x", "x.safetensors", CPU), hint)
    resized = control._hint(64, 32)
    assert resized.shape == (1, 3, 32, 64) and bool((resized == 1.0).all())
    images = torch.arange(3.0).reshape(3, 1, 1, 1)
    assert broadcast_rows(images[:1], 4, 2).flatten().tolist() == [0, 0, 0, 0]
    assert broadcast_rows(images[:2], 6, 2).flatten().tolist() == [0, 1, 0, 1, 0, 1]
    assert broadcast_rows(images[:2], 6, 3).flatten().tolist() == [0, 1, 0, 0, 1, 0]
    assert broadcast_rows(images, 4, 2).flatten().tolist() == [0, 1, 0, 1]
    assert T2I in engine.paths.list("controlnet") and CN in engine.paths.list("controlnet")  # both folders

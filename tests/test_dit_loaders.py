"""SD3.5 and Flux.1 files in their published layouts: the test writer, configs from shapes, key conversion,
and the loaders of separate files (issue 15, items 4 and 10)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dit_helpers import CPU
from tui_diffusion.modelfiles import convert_dit
from tui_diffusion.modelfiles.header import read_header
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import models_dit as md


def _diffusers_flux_converter(width: int):
    """diffusers' own Flux converter, which hard-codes the full width 3072, run with ``width`` instead."""
    import diffusers.loaders.single_file_utils as su

    source = inspect.getsource(su.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(su))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _equal_states(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("sizes", [w.TinySD3(), w.TinySD3(qk_norm=False, dual_attention_layers=())],
                         ids=["sd35-medium-like", "sd3-like"])
def test_sd3_file_matches_diffusers_converter(tmp_path: Path, sizes: w.TinySD3) -> None:
    import diffusers.loaders.single_file_utils as su

    path = w.write_sd3_transformer(tmp_path / "sd3.safetensors", sizes)
    state = load_file(str(path))
    assert all(k.startswith("model.diffusion_model.") for k in state)
    reference = w.build_sd3_transformer(sizes).state_dict()
    _equal_states(su.convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), reference)
    config = convert_dit.sd3_config(read_header(path), str(path))
    assert config["num_layers"] == sizes.depth and config["num_attention_heads"] == sizes.depth
    assert config["dual_attention_layers"] == list(sizes.dual_attention_layers)
    assert config["qk_norm"] == ("rms_norm" if sizes.qk_norm else None)
    _equal_states(convert_dit.sd3_to_diffusers(state, config), reference)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_file_matches_diffusers_converter(tmp_path: Path, guidance: bool) -> None:
    sizes = w.TinyFlux(guidance=guidance, heads=2, layers=2, single_layers=2)
    path = w.write_flux_transformer(tmp_path / "flux1.safetensors", sizes)
    state = load_file(str(path))
    assert "double_blocks.0.img_attn.qkv.weight" in state and not any(k.startswith("model.") for k in state)
    assert ("guidance_in.in_layer.weight" in state) == guidance
    reference = w.build_flux_transformer(sizes).state_dict()
    _equal_states(_diffusers_flux_converter(256)(dict(state)), reference)
    config = convert_dit.flux_config(read_header(path), str(path))
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (2, 2, 2)
    assert config["guidance_embeds"] == guidance
    _equal_states(convert_dit.flux_to_diffusers(state, config), reference)


@pytest.mark.parametrize("dtype,stored", [("fp16", "F16"), ("bf16", "BF16"), ("fp8_e4m3fn", "F8_E4M3"),
                                          ("fp8_e5m2", "F8_E5M2")])
def test_writer_dtypes(tmp_path: Path, dtype: str, stored: str) -> None:
    path = w.write_flux_transformer(tmp_path / "f.safetensors", w.TinyFlux(guidance=False), dtype=dtype)
    assert {info.dtype for info in read_header(path).values()} == {stored}


def test_text_encoder_files_and_all_in_one_layouts(tmp_path: Path) -> None:
    files = w.write_text_encoders(tmp_path / "text_encoders")
    clip_l, clip_g, t5 = (read_header(files[n]) for n in ("clip_l", "clip_g", "t5xxl"))
    assert "text_model.embeddings.token_embedding.weight" in clip_l and "text_projection.weight" not in clip_l
    assert "text_projection.weight" in clip_g
    assert "shared.weight" in t5 and "encoder.embed_tokens.weight" not in t5
    assert t5["shared.weight"].shape == (32128, 128)

    sd3 = read_header(w.write_sd3_checkpoint(tmp_path / "sd3.5_all.safetensors"))
    flux = read_header(w.write_flux_checkpoint(tmp_path / "flux1-dev-fp8.safetensors", dtype="fp8_e4m3fn"))
    for header, vae in ((sd3, "first_stage_model."), (flux, "vae.")):
        assert vae + "decoder.conv_in.weight" in header
        assert header[vae + "decoder.conv_in.weight"].shape[1] == 16
        assert "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight" in header
        assert "text_encoders.t5xxl.transformer.shared.weight" in header
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in sd3
    assert "text_encoders.clip_g.transformer.text_projection.weight" in sd3
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in flux
    assert not any(k.startswith("text_encoders.clip_g.") for k in flux)


# -- loader nodes -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI's folders: a Flux transformer in the old unet/ folder, SD3.5's in diffusion_models/, text encoders
    in text_encoders/ and one in the old clip/ folder."""
    root = Path(tmp_path_factory.mktemp("models"))
    w.write_flux_transformer(root / "unet" / "flux1-schnell.safetensors", w.TinyFlux(guidance=False))
    w.write_sd3_transformer(root / "diffusion_models" / "sd3.5_large.safetensors",
                            w.TinySD3(dual_attention_layers=()))
    files = w.write_text_encoders(root / "text_encoders")
    (root / "clip").mkdir()
    files["clip_l"].rename(root / "clip" / "clip_l.safetensors")
    return root


def _ctx(root: Path, tmp_path: Path):
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy

    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(4), ModelPaths(root), tmp_path / "out",
                         tmp_path / "tmp", tmp_path / "cfg")
    return NodeContext(engine, "1", {}, lambda *a: None, lambda: False)


def test_loader_and_conditioning_nodes(models_root: Path, tmp_path: Path) -> None:
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.registry import implementations

    nodes = implementations()
    ctx = _ctx(models_root, tmp_path)
    paths = ModelPaths(models_root)
    assert paths.list("diffusion_models") == ["flux1-schnell.safetensors", "sd3.5_large.safetensors"]
    assert paths.list("text_encoders") == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]

    (flux,) = nodes["UNETLoader"](ctx, unet_name="flux1-schnell.safetensors", weight_dtype="fp8_e4m3fn").outputs
    assert flux.family.id == "flux" and not flux.unet.config.guidance_embeds
    (sampled,) = nodes["ModelSamplingFlux"](ctx, model=flux, max_shift=1.15, base_shift=0.5, width=1024,
                                            height=1024).outputs
    assert sampled.model_sampling.describe() == "FluxSampling(shift=1.15)"
    (clip,) = nodes["DualCLIPLoader"](ctx, clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                                      type="flux").outputs
    (cond,) = nodes["CLIPTextEncodeFlux"](ctx, clip=clip, clip_l="a cat", t5xxl="a photo of a cat",
                                          guidance=3.5).outputs
    assert cond[0][0].shape == (1, 256, 128) and cond[0][1]["guidance"] == 3.5
    (cond,) = nodes["FluxGuidance"](ctx, conditioning=cond, guidance=2.0).outputs
    assert cond[0][1]["guidance"] == 2.0
    (zero,) = nodes["ConditioningZeroOut"](ctx, conditioning=cond).outputs
    assert not zero[0][0].any() and not zero[0][1]["pooled_output"].any() and cond[0][0].any()
    (latent,) = nodes["EmptySD3LatentImage"](ctx, width=64, height=48, batch_size=2).outputs
    assert latent["samples"].shape == (2, 16, 6, 8)

    (sd3,) = nodes["UNETLoader"](ctx, unet_name="sd3.5_large.safetensors").outputs
    (sd3,) = nodes["ModelSamplingSD3"](ctx, model=sd3, shift=5.0).outputs
    assert sd3.model_sampling.describe() == "DiscreteFlowSampling(shift=5, multiplier=1000)"
    (clip3,) = nodes["TripleCLIPLoader"](ctx, clip_name1="t5xxl_fp16.safetensors", clip_name2="clip_l.safetensors",
                                         clip_name3="clip_g.safetensors").outputs
    (cond3,) = nodes["CLIPTextEncodeSD3"](ctx, clip=clip3, clip_l="a cat", clip_g="a cat", t5xxl="",
                                          empty_padding="none").outputs
    assert cond3[0][0].shape == (1, 77, 96) and cond3[0][1]["pooled_output"].shape == (1, 96)
    with pytest.raises(NodeError, match="CLIPTextEncodeFlux needs FLUX text encoders"):
        nodes["CLIPTextEncodeFlux"](ctx, clip=clip3, clip_l="", t5xxl="", guidance=3.5)
    with pytest.raises(NodeError, match="ModelSamplingFlux needs a Flux model"):
        nodes["ModelSamplingFlux"](ctx, model=sd3)
    with pytest.raises(NodeError, match="type flux takes CLIP-L and T5-XXL"):
        nodes["DualCLIPLoader"](ctx, clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors", type="flux")
    with pytest.raises(NodeError, match="type 'wan' is not supported"):
        nodes["CLIPLoader"](ctx, clip_name="t5xxl_fp16.safetensors", type="wan")
    (sdxl_clip,) = nodes["DualCLIPLoader"](ctx, clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors",
                                           type="sdxl").outputs
    assert [e.pooled for e in sdxl_clip.encoders] == [False, True] and sdxl_clip.layer == -2
    with pytest.raises(NodeError, match="not found"):
        nodes["UNETLoader"](ctx, unet_name="missing.safetensors")


def test_checkpoint_loader_takes_all_in_one_files(models_root: Path, tmp_path: Path) -> None:
    """CheckpointLoaderSimple loads an all-in-one Flux checkpoint through the Flux family (MODEL, CLIP, VAE)."""
    from tui_diffusion.pipeline.models_dit import DitClip
    from tui_diffusion.pipeline.registry import implementations

    w.write_flux_checkpoint(models_root / "checkpoints" / "flux1-schnell-fp8.safetensors", w.TinyFlux(guidance=False),
                            dtype="fp8_e4m3fn")
    model, clip, vae = implementations()["CheckpointLoaderSimple"](
        _ctx(models_root, tmp_path), ckpt_name="flux1-schnell-fp8.safetensors").outputs
    assert model.family.id == "flux" and isinstance(clip, DitClip) and clip.kind == "flux"
    assert vae.latent_channels == 16 and clip.embeddings_dir == models_root / "embeddings"


def test_unet_loader_refuses_a_file_without_a_transformer(models_root: Path, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.registry import implementations

    target = models_root / "diffusion_models" / "clip_by_mistake.safetensors"
    target.write_bytes((models_root / "text_encoders" / "clip_g.safetensors").read_bytes())
    with pytest.raises(NodeError, match="no SD3 or Flux diffusion model"):
        implementations()["UNETLoader"](_ctx(models_root, tmp_path), unet_name="clip_by_mistake.safetensors")
    target.unlink()


def test_comfyui_scaled_fp8_weights_are_dequantised_on_load(tmp_path: Path) -> None:
    """ComfyUI's scaled fp8 files (``scaled_fp8`` marker, fp8 ``weight`` times a per-layer ``scale_weight``) load as
    the dequantised weights."""
    from tui_diffusion.pipeline import models_dit as md
    from tui_diffusion.pipeline.device import Device

    cpu = Device(torch.device("cpu"), torch.float32, torch.float32, "CPU")
    sizes = w.TinyFlux(guidance=False)
    state = w.flux_to_original(w.build_flux_transformer(sizes).state_dict(), 1, 1)
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0
            q = (value / scale).to(torch.float8_e4m3fn)
            scaled[key], scaled[key[: -len(".weight")] + ".scale_weight"] = q, scale.reshape(1)
            expected[key] = q.float() * scale
        else:
            scaled[key] = expected[key] = value
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in scaled.items()}, str(tmp_path / "scaled.safetensors"))
    w.save(expected, tmp_path / "expected.safetensors")
    _, ours = md.load_transformer(md.TensorReader(tmp_path / "scaled.safetensors"), cpu)
    _, reference = md.load_transformer(md.TensorReader(tmp_path / "expected.safetensors"), cpu)
    _equal_states(ours.state_dict(), reference.state_dict())
    assert not torch.equal(ours.state_dict()["proj_out.weight"], w.build_flux_transformer(sizes).state_dict()[
        "proj_out.weight"])


def test_fp8_weight_dtype_keeps_the_transformer_in_fp8_and_computes_as_rounded_weights(models_root: Path) -> None:
    """UNETLoader's fp8 ``weight_dtype``: the linear layers are held in fp8 (a quarter of fp32's bytes) and
    upcast per call, so the output is that of the same model with those layers rounded through fp8."""
    path = models_root / "unet" / "flux1-schnell.safetensors"
    _, stored = md.load_transformer(md.TensorReader(path), CPU, "fp8_e4m3fn")
    _, rounded = md.load_transformer(md.TensorReader(path), CPU)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                for param in module.parameters():
                    param.copy_(param.to(torch.float8_e4m3fn).float())
    linear = [m for m in stored.modules() if isinstance(m, torch.nn.Linear)]
    assert {p.dtype for m in linear for p in m.parameters()} == {torch.float8_e4m3fn}
    g = torch.Generator().manual_seed(0)
    args = {"hidden_states": torch.randn(1, 12, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, 128, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(12, 3), "txt_ids": torch.zeros(5, 3), "return_dict": False}
    with torch.no_grad():
        torch.testing.assert_close(stored(**args)[0], rounded(**args)[0], rtol=0, atol=0)


def test_which_transformers_stay_in_fp8() -> None:
    from tui_diffusion.modelfiles.header import TensorInfo
    from tui_diffusion.pipeline.device import Device

    def header(dtype: str, scaled: bool = False) -> dict[str, TensorInfo]:
        out = {f"double_blocks.{i}.img_attn.qkv.weight": TensorInfo(dtype, (96, 32)) for i in range(4)}
        out["final_layer.linear.weight"] = TensorInfo("BF16", (64, 32))  # a minority kept in bf16
        out["double_blocks.0.img_attn.norm.query_norm.scale"] = TensorInfo("BF16", (16,))
        if scaled:
            out["double_blocks.0.img_attn.qkv.scale_weight"] = TensorInfo("F32", (1,))
        return out

    gpu = Device(torch.device("cpu"), torch.bfloat16, torch.float32, "test")
    sequential = Device(torch.device("cpu"), torch.bfloat16, torch.float32, "test", offload="sequential")
    assert md.fp8_storage(header("F8_E4M3"), "", "default", gpu) is torch.float8_e4m3fn
    assert md.fp8_storage(header("F8_E5M2"), "", "default", gpu) is torch.float8_e5m2
    assert md.fp8_storage(header("BF16"), "", "default", gpu) is None
    assert md.fp8_storage(header("BF16"), "", "fp8_e4m3fn", gpu) is torch.float8_e4m3fn
    assert md.fp8_storage(header("F8_E4M3", scaled=True), "", "default", gpu) is None  # scaled: upcast
    assert md.fp8_storage(header("F8_E4M3"), "", "default", sequential) is None


def test_lowvram_streams_the_transformers_blocks_and_computes_the_same(models_root: Path) -> None:
    """``--lowvram`` (model offload) on a diffusion transformer: diffusers' group offloading per block instead of
    the whole model at once (it does not fit a small GPU); here the onload device is the CPU, the same code path
    as a GPU's without the side stream."""
    from types import SimpleNamespace

    from tui_diffusion.pipeline.device import Device

    _NONE = SimpleNamespace(hooks={})
    path = models_root / "unet" / "flux1-schnell.safetensors"
    lowvram = Device(torch.device("cpu"), torch.float32, torch.float32, "test", offload="model")
    _, streamed = md.load_transformer(md.TensorReader(path), lowvram)
    _, plain = md.load_transformer(md.TensorReader(path), CPU)
    hooked = [m for m in streamed.modules()
              if any(name.startswith("group_offloading") for name in getattr(m, "_diffusers_hook", _NONE).hooks)]
    assert len(hooked) >= len(streamed.transformer_blocks) + len(streamed.single_transformer_blocks)
    g = torch.Generator().manual_seed(0)
    args = {"hidden_states": torch.randn(1, 12, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, 128, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(12, 3), "txt_ids": torch.zeros(5, 3), "return_dict": False}
    with torch.no_grad():
        torch.testing.assert_close(streamed(**args)[0], plain(**args)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("loader", "inputs", "runs"), [
    ("DualCLIPLoader", {"clip_name1": "a.safetensors", "clip_name2": "b.safetensors", "type": "kandinsky5_image"},
     "sdxl, sd3, flux"),
    ("CLIPLoader", {"clip_name": "a.safetensors", "type": "wan"}, "stable_diffusion, sd3"),
])
def test_a_comfyui_clip_type_this_program_does_not_run_is_named_when_validating(loader: str, inputs: dict,
                                                                               runs: str) -> None:
    """ComfyUI's Kandinsky 5 template validated with nothing missing and failed only once its models loaded: the
    loader's type is now named before anything runs, and the app's form says the same."""
    from tui_diffusion.graph.specs import get_spec
    from tui_diffusion.graph.validate import check_value, validate_workflow
    from tui_diffusion.graph.workflow import Workflow

    graph = {
        "1": {"class_type": loader, "inputs": inputs},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 0]}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": "m.safetensors", "weight_dtype": "default"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                                   "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["4", 0]}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    issues = validate_workflow(Workflow.from_data(graph))
    [issue] = [i for i in issues if i.input == "type"]
    assert issue.node_id == "1" and f"(it runs: {runs})" in issue.message and repr(inputs["type"]) in issue.message
    spec = get_spec(loader)
    assert spec is not None and check_value(spec.input("type"), runs.split(", ")[-1]) is None  # type: ignore[arg-type]

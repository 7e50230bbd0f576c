"""CheckpointSave of SD3/SD3.5 and Flux.1 models (issue 16, item 6): ComfyUI's all-in-one layout (the transformer's
original keys under ``model.diffusion_model.``, the text encoders under ``text_encoders.<name>.transformer.``, the VAE
under ``first_stage_model.`` for SD3 and ``vae.`` for Flux) and its metadata, LoRAs baked in, fp8 kept as fp8, and
the saved file loading back here as the same model. Before, both families were refused ("not supported yet")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tui_diffusion.families import by_id
from tui_diffusion.modelfiles.header import read_header
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import checkpoint_writer_lora_dit as lw
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.models import ClipHandle, ModelCache, ModelHandle, TextEncoder, VaeHandle
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
SD3_FILE, FLUX_FP8 = "sd35-tiny.safetensors", "flux-schnell-fp8.safetensors"
FLUX_LORA, SD3_LORA = "flux-lora.safetensors", "sd3-lora.safetensors"
SCALED = "flux1-dev-fp8-scaled.safetensors"
MODEL = "model.diffusion_model."


def _te_pairs(prefix: str, layers: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """kohya's text-encoder LoRA keys (``lora_te1_*``) for the named layers, random."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in layers.items():
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(2, cols, generator=gen) * 0.1
        out[f"{key}.lora_up.weight"] = torch.randn(rows, 2, generator=gen) * 0.1
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flux as separate files (transformer, ``ae``, CLIP-L, CLIP-G, T5), an SD3.5 all-in-one checkpoint in fp32, a
    Flux schnell all-in-one checkpoint in fp8, and a LoRA for each family's transformer and one text encoder."""
    root = Path(tmp_path_factory.mktemp("dit-save"))
    w.write_flux_transformer(root / "diffusion_models" / "flux1-dev.safetensors")
    w.write_vae16(root / "vae" / "ae.safetensors", flux=True)
    w.write_text_encoders(root / "text_encoders")
    w.write_sd3_checkpoint(root / "checkpoints" / SD3_FILE)
    w.write_flux_checkpoint(root / "checkpoints" / FLUX_FP8, w.TinyFlux(guidance=False), dtype="fp8_e4m3fn")
    # ComfyUI's scaled fp8 storage of the same transformer: fp8 matrices times a per-layer scale, and its marker
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in w.flux_to_original(w.build_flux_transformer().state_dict(), 1, 1).items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448.0
            scaled[key], scaled[key.removesuffix(".weight") + ".scale_weight"] = (value / scale).to(
                torch.float8_e4m3fn), scale.reshape(1)
        else:
            scaled[key] = value
    save_file({k: v.contiguous() for k, v in scaled.items()}, str(root / "diffusion_models" / SCALED))
    text = w.TinyText()
    # Flux: every fused layer of Black Forest Labs' names (ComfyUI's LoRA layout), and T5 (ComfyUI's te2 of Flux)
    flux = lw.lora_state(lw.random_pairs(lw.original_layers(w.build_flux_transformer()), seed=3), "comfyui", 1.0)
    flux.update(_te_pairs("lora_te2_", {"encoder.block.0.layer.0.SelfAttention.q": (text.t5_width, text.t5_width)}, 4))
    (root / "loras").mkdir()
    save_file(flux, str(root / "loras" / FLUX_LORA))
    # SD3: kohya's names of the MMDiT, and CLIP-G (te2 of SD3)
    sd3 = lw.lora_state(lw.random_pairs(lw.original_layers(w.build_sd3_transformer()), seed=5), "kohya", 1.0)
    width = text.clip_g_width
    sd3.update(_te_pairs("lora_te2_", {"text_model.encoder.layers.0.self_attn.q_proj": (width, width)}, 6))
    save_file(sd3, str(root / "loras" / SD3_LORA))
    return root


@pytest.fixture(scope="module")
def engine(root: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineState:
    tmp = Path(tmp_path_factory.mktemp("dit-save-engine"))
    return EngineState(CPU, ModelCache(8), ModelPaths(root), tmp / "out", tmp / "tmp", tmp / "cfg")


def ctx(engine: EngineState, workflow: dict | None = None) -> NodeContext:
    return NodeContext(engine, "1", workflow or {}, report=lambda *a: None, interrupted=lambda: False)


def run(engine: EngineState, class_type: str, **inputs: Any) -> tuple:
    return implementations()[class_type](ctx(engine), **inputs).outputs


def save(engine: EngineState, model: Any, clip: Any, vae: Any, prefix: str, workflow: dict | None = None) -> Path:
    result = implementations()["CheckpointSave"](ctx(engine, workflow), model=model, clip=clip, vae=vae,
                                                 filename_prefix=prefix)
    return Path(result.files[0])


def load_back(engine: EngineState, root: Path, path: Path) -> tuple:
    """The saved file through CheckpointLoaderSimple (linked into the models' checkpoints folder)."""
    name = f"{path.parent.name}-{path.name}"
    os.link(path, root / "checkpoints" / name)
    return run(engine, "CheckpointLoaderSimple", ckpt_name=name)


def header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def flux_parts(engine: EngineState) -> tuple:
    model = run(engine, "UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")[0]
    clip = run(engine, "DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
               type="flux")[0]
    return model, clip, run(engine, "VAELoader", vae_name="ae.safetensors")[0]


def image(engine: EngineState, model: Any, clip: Any, vae: Any, seed: int = 7) -> torch.Tensor:
    """A two-step txt2img run through the nodes (the sampler applies the MODEL's patches, the encoder the CLIP's)."""
    positive = run(engine, "CLIPTextEncode", clip=clip, text="a red fox in the snow")[0]
    negative = run(engine, "CLIPTextEncode", clip=clip, text="")[0]
    latent = run(engine, "EmptySD3LatentImage", width=32, height=32, batch_size=1)[0]
    samples = run(engine, "KSampler", model=model, seed=seed, steps=2, cfg=2.0, sampler_name="euler",
                  scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]
    return run(engine, "VAEDecode", samples=samples, vae=vae)[0]


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_flux_from_separate_loaders_is_saved_as_one_all_in_one_file_of_the_published_tensors(
        engine: EngineState, root: Path) -> None:
    """UNETLoader + DualCLIPLoader (flux) + VAELoader -> one file: each part's tensors exactly as its own file holds
    them, under ComfyUI's prefixes for Flux; no modelspec (ComfyUI writes none for Flux), the workflow in it."""
    model, clip, vae = flux_parts(engine)
    workflow = {"9": {"class_type": "CheckpointSave", "inputs": {"filename_prefix": "checkpoints/flux"}}}
    path = save(engine, model, clip, vae, "checkpoints/flux", workflow)
    assert path == engine.output_dir / "checkpoints" / "flux_00001_.safetensors"
    tensors, meta = header(path)
    parts = {MODEL: load_file(str(root / "diffusion_models" / "flux1-dev.safetensors")),
             "vae.": load_file(str(root / "vae" / "ae.safetensors")),
             "text_encoders.clip_l.transformer.": load_file(str(root / "text_encoders" / "clip_l.safetensors")),
             "text_encoders.t5xxl.transformer.": load_file(str(root / "text_encoders" / "t5xxl_fp16.safetensors"))}
    assert_same(tensors, {prefix + k: v for prefix, sd in parts.items() for k, v in sd.items()})
    assert not any(k.startswith("modelspec.") for k in meta)  # ComfyUI: no modelspec, no predict_key for Flux
    assert json.loads(meta["prompt"]) == workflow and "nodes" in json.loads(meta["workflow"])

    back = load_back(engine, root, path)
    assert back[0].family is by_id("flux") and back[0].model_sampling.describe() == "FluxSampling(shift=1.15)"
    assert_same(params(back[0].unet), params(model.unet))


def test_flux_with_a_lora_saves_the_patched_model_which_samples_the_same_image(engine: EngineState,
                                                                             root: Path) -> None:
    model, clip, vae = flux_parts(engine)
    lora_model, lora_clip = run(engine, "LoraLoader", model=model, clip=clip, lora_name=FLUX_LORA,
                                strength_model=0.8, strength_clip=0.7)
    path = save(engine, lora_model, lora_clip, vae, "flux/lora")
    back_model, back_clip, back_vae = load_back(engine, root, path)
    assert not back_model.patches and not back_clip.patches
    with patched({"unet": model.unet}, list(lora_model.patches)):
        want = params(model.unet)
    assert_same(params(back_model.unet), want)
    assert not torch.equal(want["transformer_blocks.0.attn.to_q.weight"], params(model.unet)[
        "transformer_blocks.0.attn.to_q.weight"])  # the LoRA changed the model that was saved
    with patched(clip.parts(), list(lora_clip.patches)):
        want_t5 = params(clip.t5.model)
    assert_same(params(back_clip.t5.model), want_t5)
    assert not torch.equal(want_t5["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           params(clip.t5.model)["encoder.block.0.layer.0.SelfAttention.q.weight"])
    # the same seed gives the same image from the saved file as from the patched model
    live = image(engine, lora_model, lora_clip, vae)
    torch.testing.assert_close(image(engine, back_model, back_clip, back_vae), live, rtol=0, atol=1e-5)


def test_sd3_with_a_lora_saves_comfyui_s_layout_and_metadata_and_the_patched_model(engine: EngineState,
                                                                                   root: Path) -> None:
    model, clip, vae = run(engine, "CheckpointLoaderSimple", ckpt_name=SD3_FILE)
    lora_model, lora_clip = run(engine, "LoraLoader", model=model, clip=clip, lora_name=SD3_LORA,
                                strength_model=1.0, strength_clip=1.0)
    path = save(engine, lora_model, lora_clip, vae, "checkpoints/sd3")
    tensors, meta = header(path)
    # the keys of the published all-in-one layout (first_stage_model., all three text encoders)
    assert set(tensors) == set(read_header(root / "checkpoints" / SD3_FILE))
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "text_encoders"}
    assert {k.split(".")[1] for k in tensors if k.startswith("text_encoders.")} == {"clip_l", "clip_g", "t5xxl"}
    assert meta["modelspec.architecture"] == "stable-diffusion-v3-medium"  # what ComfyUI writes for every SD3
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"] == "sgm"
    assert meta["modelspec.title"] == "sd3 1" and "modelspec.predict_key" not in meta  # a flow model
    assert "v_pred" not in tensors

    back_model, back_clip, _ = load_back(engine, root, path)
    assert back_model.family is by_id("sd3")
    with patched({"unet": model.unet}, list(lora_model.patches)):
        want = params(model.unet)
        # the same transformer output from the saved model as from the patched one
        g = torch.Generator().manual_seed(2)
        x, context, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 20, 128, generator=g), \
            torch.randn(1, 96, generator=g)
        entries = [(context, {"pooled_output": pooled})]
        kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=tuple(x.shape), negative=[False],
                                           device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            live = model.family.apply_model(model, x, torch.tensor([500.0]), kwargs)
    with torch.no_grad():
        saved = back_model.family.apply_model(back_model, x, torch.tensor([500.0]), kwargs)
    torch.testing.assert_close(saved, live, rtol=0, atol=0)
    assert_same(params(back_model.unet), want)
    assert not torch.equal(want["transformer_blocks.0.attn.to_q.weight"],
                           params(model.unet)["transformer_blocks.0.attn.to_q.weight"])
    # the CLIP-G LoRA is in the saved text encoder: the same prompt encodes the same
    text = "a lighthouse at dusk"
    (saved_cond,) = run(engine, "CLIPTextEncode", clip=back_clip, text=text)
    (live_cond,) = run(engine, "CLIPTextEncode", clip=lora_clip, text=text)
    (plain_cond,) = run(engine, "CLIPTextEncode", clip=clip, text=text)
    torch.testing.assert_close(saved_cond[0][0], live_cond[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(saved_cond[0][1]["pooled_output"], live_cond[0][1]["pooled_output"], rtol=0, atol=1e-6)
    assert not torch.allclose(plain_cond[0][1]["pooled_output"], live_cond[0][1]["pooled_output"])


def test_an_fp8_flux_checkpoint_is_written_in_fp8_and_loads_back_as_the_same_fp8_model(engine: EngineState,
                                                                                       root: Path) -> None:
    """A transformer kept in fp8 (its file's weights are fp8) is written with its matrices in fp8, as ComfyUI
    writes its fp8 models, and loads back into fp8 storage with the same weights."""
    model, clip, vae = run(engine, "CheckpointLoaderSimple", ckpt_name=FLUX_FP8)
    assert model.unet.state_dict()["proj_out.weight"].dtype == torch.float8_e4m3fn
    path = save(engine, model, clip, vae, "fp8/flux")
    stored = {k: v.dtype for k, v in read_header(path).items() if k.startswith(MODEL) and len(v.shape) >= 2}
    assert stored and set(stored.values()) == {"F8_E4M3"}
    back_model, *_ = load_back(engine, root, path)
    assert back_model.unet.state_dict()["proj_out.weight"].dtype == torch.float8_e4m3fn
    assert_same(params(back_model.unet), params(model.unet))


def test_a_scaled_fp8_transformer_is_written_as_the_weights_it_runs_with(engine: EngineState, root: Path) -> None:
    """ComfyUI's scaled fp8 is dequantised on loading, so the transformer runs in the compute dtype: that is what is
    written (no fp8 re-quantisation, which would change the model; no ``scale_weight``), and it loads back equal."""
    _, clip, vae = flux_parts(engine)
    model = run(engine, "UNETLoader", unet_name=SCALED, weight_dtype="default")[0]
    path = save(engine, model, clip, vae, "scaled/flux")
    saved = read_header(path)
    assert not any(k.endswith((".scale_weight", "scaled_fp8")) for k in saved)
    assert {v.dtype for k, v in saved.items() if k.startswith(MODEL)} == {"F32"}  # the CPU's compute dtype
    back_model, *_ = load_back(engine, root, path)
    assert_same(params(back_model.unet), params(model.unet))


def _tiny_vae4() -> VaeHandle:
    from diffusers import AutoencoderKL

    return VaeHandle(AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32).eval(), CPU)


@pytest.fixture(scope="module")
def flux(engine: EngineState) -> tuple:
    return flux_parts(engine)


def _refused(engine: EngineState, model: Any, clip: Any, vae: Any, match: str) -> None:
    before = sorted(engine.output_dir.rglob("*")) if engine.output_dir.exists() else []
    with pytest.raises(NodeError, match=match) as err:
        save(engine, model, clip, vae, "refused/x")
    assert "Traceback" not in str(err.value)
    assert (sorted(engine.output_dir.rglob("*")) if engine.output_dir.exists() else []) == before


def test_a_clip_of_another_family_is_refused_by_name(engine: EngineState, flux: tuple) -> None:
    model, _, vae = flux
    triple = run(engine, "TripleCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                 clip_name3="t5xxl_fp16.safetensors")[0]
    _refused(engine, model, triple, vae, r"clip: a CLIP with clip_l, clip_g, t5xxl, but a Flux.1 checkpoint holds "
                                         r"clip_l, t5xxl")
    sd_clip = ClipHandle([TextEncoder(None, triple.clip_l.model)], CPU)
    _refused(engine, model, sd_clip, vae, r"clip: a CLIP of the SD1.x/SD2.x/SDXL kind, but a Flux.1 checkpoint")


def test_a_t5_of_another_width_is_refused(engine: EngineState, flux: tuple) -> None:
    from tui_diffusion.pipeline.models_dit import make_clip

    model, clip, vae = flux
    t5 = w.build_t5(w.TinyText(t5_width=64, t5_ff=128))
    narrow = make_clip("flux", {"clip_l": clip.clip_l.model, "t5xxl": t5}, CPU)
    _refused(engine, model, narrow, vae, r"clip: its T5 is 64 wide, but this Flux.1 model reads a context 128 wide")


def test_a_vae_of_another_latent_space_is_refused(engine: EngineState, flux: tuple) -> None:
    model, clip, _ = flux
    _refused(engine, model, clip, _tiny_vae4(), r"vae: a VAE with 4 latent channels, but a Flux.1 model works in 16")


def test_what_cannot_be_saved_says_so(engine: EngineState, flux: tuple) -> None:
    """A family CheckpointSave does not write (Lotus), and weights it cannot read (--novram's meta tensors)."""
    model, clip, vae = flux
    lotus = ModelHandle(model.unet, {}, by_id("lotus"), CPU, "lotus")
    _refused(engine, lotus, clip, _tiny_vae4(), r"model: saving a Lotus.* model as a checkpoint is not supported yet")
    offloaded = ModelHandle(w.build_flux_transformer().to("meta"), {}, by_id("flux"), CPU, "meta")
    _refused(engine, offloaded, clip, vae, r"--novram")

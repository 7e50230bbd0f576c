"""SD3/SD3.5 on tiny files in Stability's layouts: recognised, loaded from separate files and all-in-one
checkpoints (fp16/bf16/fp8), conditioned as ComfyUI does, and equal to diffusers' SD3 transformer and
``StableDiffusion3Pipeline`` on the same weights, noise and sigmas (issue 15, items 4, 5 and 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dit_helpers import CPU, run, shared_models
from tui_diffusion.families import detect
from tui_diffusion.modelfiles import convert_dit
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import models_dit as md

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = Path(tmp_path_factory.mktemp("sd3"))
    out = {"transformer": w.write_sd3_transformer(root / "diffusion_models" / "sd3.5_medium.safetensors"),
           "vae": w.write_vae16(root / "vae" / "sd3_vae.safetensors", flux=False),
           "checkpoint": w.write_sd3_checkpoint(root / "checkpoints" / "sd3.5_medium_incl_clips.safetensors")}
    shared = shared_models(tmp_path_factory) / "text_encoders"  # the same seed's encoders, written once
    out.update({name: shared / f"{stem}.safetensors"
                for name, stem in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16"))})
    return out


@pytest.fixture(scope="module")
def loaded(files: dict[str, Path]) -> tuple:
    kind, transformer = md.load_transformer(md.TensorReader(files["transformer"]), CPU)
    clip = md.load_text_encoders([files["clip_g"], files["clip_l"], files["t5xxl"]], "sd3", CPU)
    return md.model_handle(kind, transformer, CPU, str(files["transformer"])), clip


def test_recognised_from_its_header(files: dict[str, Path]) -> None:
    assert detect(read_header(files["transformer"])).id == "sd3"
    assert detect(read_header(files["checkpoint"])).id == "sd3"
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in read_header(files["transformer"]).items()}
    assert detect(bare).id == "sd3"


def test_full_size_configs_are_what_the_shapes_say() -> None:
    """The shipped SD3.5 configs, built on the meta device and written in Stability's layout, read back equal."""
    from diffusers import SD3Transformer2DModel

    from tui_diffusion.modelfiles.header import TensorInfo

    for name, params in (("sd3.5-large", 8.06e9), ("sd3.5-medium", 2.24e9)):
        shipped = convert_dit.shipped_config(name)
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(shipped)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
        original = w.sd3_to_original(model.state_dict(), shipped["num_layers"])
        header = {k: TensorInfo("BF16", tuple(v.shape)) for k, v in original.items()}
        derived = convert_dit.sd3_config(header, name)
        assert {k: v for k, v in derived.items() if k in shipped} == shipped


def test_transformer_output_equals_diffusers(files: dict[str, Path], loaded: tuple, tmp_path: Path) -> None:
    """Our key conversion and model call against diffusers' own single-file loader of the same file."""
    from diffusers import SD3Transformer2DModel

    model, _ = loaded
    config_dir = tmp_path / "cfg" / "transformer"
    config_dir.mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps(convert_dit.sd3_config(read_header(files["transformer"]),
                                                                              "sd3")))
    theirs = SD3Transformer2DModel.from_single_file(str(files["transformer"]), config=str(tmp_path / "cfg"),
                                                    subfolder="transformer", local_files_only=True,
                                                    torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    context, pooled = torch.randn(2, 90, 128, generator=g), torch.randn(2, 96, generator=g)
    t = torch.tensor([700.0, 250.0])
    entries = [(context[i:i + 1], {"pooled_output": pooled[i:i + 1]}) for i in range(2)]
    kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=(1, 16, 8, 8), negative=[False, False],
                                       device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        ours = model.family.apply_model(model, x, t, kwargs)
        ref = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                     return_dict=False)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_text_conditioning_as_comfyui(loaded: tuple, files: dict[str, Path]) -> None:
    _, clip = loaded
    emb, pooled = clip.encode_prompt(PROMPT)
    # CLIP-L (32) and CLIP-G (64) side by side, zero-padded to T5's width (128), then T5 padded to 77 tokens
    assert emb.shape == (1, 77 + 77, 128) and pooled.shape == (1, 32 + 64)
    assert torch.count_nonzero(emb[:, :77, 96:]) == 0 and torch.count_nonzero(emb[:, 77:, 96:]) > 0
    # without T5 (ComfyUI's T5-optional SD3): the CLIP part alone
    no_t5 = md.load_text_encoders([files["clip_l"], files["clip_g"]], "sd3", CPU)
    emb2, pooled2 = no_t5.encode_prompt(PROMPT)
    assert emb2.shape == (1, 77, 96)
    torch.testing.assert_close(emb2, emb[:, :77, :96])
    torch.testing.assert_close(pooled2, pooled)
    # a long prompt takes a second CLIP window; T5 is never cut into windows
    long_emb, _ = clip.encode_prompt(" ".join(["cat"] * 100))
    assert long_emb.shape[1] == 154 + 101
    # empty_padding "none": an empty T5 text leaves T5 out
    emb3, _ = clip.encode_sd3(PROMPT, PROMPT, "", empty_padding=False)
    assert emb3.shape == (1, 77, 96)
    # a weighted token moves away from the empty prompt's encoding
    weighted, _ = clip.encode_prompt("a photo of a (cat:1.5)")
    assert not torch.allclose(weighted, emb)


def test_all_in_one_checkpoint_and_fp8(files: dict[str, Path], loaded: tuple, tmp_path: Path) -> None:
    loaded_ckpt = md.load_dit_checkpoint(files["checkpoint"], read_header(files["checkpoint"]), CPU, tmp_path)
    assert loaded_ckpt.model.family.id == "sd3" and loaded_ckpt.vae.latent_channels == 16
    assert loaded_ckpt.model.model_sampling.describe() == "DiscreteFlowSampling(shift=3, multiplier=1000)"
    separate_model, separate_clip = loaded
    for a, b in zip(loaded_ckpt.model.unet.state_dict().values(), separate_model.unet.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(loaded_ckpt.clip.encode_prompt(PROMPT)[0], separate_clip.encode_prompt(PROMPT)[0])
    # the VAE inside decodes exactly as the same weights loaded alone from vae/
    from tui_diffusion.pipeline.models import load_vae

    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    alone = load_vae(files["vae"], CPU, tmp_path)
    torch.testing.assert_close(loaded_ckpt.vae.decode(z), alone.decode(z), rtol=0, atol=0)

    fp8 = w.write_sd3_transformer(tmp_path / "fp8.safetensors", dtype="fp8_e4m3fn")
    _, model8 = md.load_transformer(md.TensorReader(fp8), CPU)
    ref = separate_model.unet.state_dict()
    # an fp8 file's transformer is held in fp8: its linear layers (the norms and the patch embedding stay fp32)
    assert {p.dtype for m in model8.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()} == {
        torch.float8_e4m3fn}
    assert {p.dtype for p in model8.pos_embed.parameters()} == {torch.float32}
    for key, value in model8.state_dict().items():
        if key.endswith("to_q.weight"):
            torch.testing.assert_close(value.float(), ref[key].to(torch.float8_e4m3fn).float(), rtol=0, atol=0)


def test_transformer_only_file_in_checkpoints_is_a_clear_error(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="without its text encoders and VAE.*UNETLoader"):
        md.load_dit_checkpoint(files["transformer"], read_header(files["transformer"]), CPU, tmp_path)


def _diffusers_pipeline(model):
    """diffusers' SD3 pipeline on the weights of the tiny files (CLIP-L's projection the identity, as diffusers
    loads SD3's CLIP-L), with a plain Euler flow scheduler that takes the sigmas it is given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoders = w.build_text_encoders()
    clip_l = CLIPTextModelWithProjection(encoders["clip_l"].config)
    clip_l.text_model.load_state_dict(encoders["clip_l"].state_dict(), strict=False)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))  # SD3's CLIP-L pooled output is unprojected
    tok_l = CLIPTokenizer.from_pretrained(str(md.config_dir("clip_tokenizer")), model_max_length=77)
    tok_g = CLIPTokenizer.from_pretrained(str(md.config_dir("clip_tokenizer")), model_max_length=77, pad_token="!")
    pipe = StableDiffusion3Pipeline(
        transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=w.build_vae16(w.SD3_VAE_FACTORS), text_encoder=clip_l.eval(), tokenizer=tok_l,
        text_encoder_2=encoders["clip_g"], tokenizer_2=tok_g, text_encoder_3=encoders["t5xxl"],
        tokenizer_3=md.t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampling_matches_diffusers_pipeline(files: dict[str, Path], loaded: tuple) -> None:
    """A txt2img run built from the family's hooks (CFG 4, Euler, SD3's shifted flow sigmas) equals
    StableDiffusion3Pipeline's on the same weights, noise and sigmas."""
    from tui_diffusion.pipeline.schedules import calculate_sigmas

    model, clip = loaded
    sigmas = calculate_sigmas(model.model_sampling, "simple", 4)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    (emb, pooled), (n_emb, n_pooled) = clip.encode_prompt(PROMPT), clip.encode_prompt("")
    ours = run(model, [[emb, {"pooled_output": pooled}]], [[n_emb, {"pooled_output": n_pooled}]], 4.0, noise, sigmas)
    theirs = _diffusers_pipeline(model)(
        prompt=PROMPT, negative_prompt="", height=64, width=64, latents=noise.clone(), sigmas=sigmas[:-1].tolist(),
        guidance_scale=4.0, max_sequence_length=77, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_ksampler_node_matches_diffusers_pipeline(loaded: tuple, tmp_path: Path) -> None:
    """The KSampler node (the project's sampling loop) on an SD3 model: ComfyUI's seeded noise, the sgm_uniform
    schedule and CFG give StableDiffusion3Pipeline's latent on the same weights, noise and sigmas."""
    from tests.test_dit_loaders import _ctx
    from tui_diffusion.pipeline.registry import implementations
    from tui_diffusion.pipeline.schedules import ksampler_sigmas

    nodes = implementations()
    ctx = _ctx(tmp_path, tmp_path)
    model, clip = loaded
    (latent,) = nodes["EmptySD3LatentImage"](ctx, width=64, height=64, batch_size=1).outputs
    emb, pooled = clip.encode_prompt(PROMPT)
    positive = [[emb, {"pooled_output": pooled}]]
    (negative,) = nodes["ConditioningZeroOut"](ctx, conditioning=positive).outputs
    (out,) = nodes["KSampler"](ctx, model=model, seed=7, steps=3, cfg=3.5, sampler_name="euler",
                               scheduler="sgm_uniform", positive=positive, negative=negative,
                               latent_image=latent).outputs
    sigmas = ksampler_sigmas(model.model_sampling, "euler", "sgm_uniform", 3, 1.0)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))  # ComfyUI's prepare_noise
    pipe = _diffusers_pipeline(model)
    theirs = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(emb),
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=64, width=64, latents=noise,
                  sigmas=sigmas[:-1].tolist(), guidance_scale=3.5, output_type="latent").images
    torch.testing.assert_close(model.family.latent_format.process_in(out["samples"]), theirs, rtol=1e-4, atol=1e-4)

"""Flux.1 on tiny files in Black Forest Labs' layout: recognised, loaded from separate files and all-in-one
checkpoints, conditioned as ComfyUI does (T5 padded to 256 tokens, CLIP-L's pooled output, embedded guidance), and
equal to diffusers' Flux transformer and ``FluxPipeline`` on the same weights, noise and sigmas (issue 15,
items 4, 6 and 10)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.dit_helpers import CPU, run, shared_models
from tests.test_dit_loaders import _diffusers_flux_converter
from tui_diffusion.families import detect
from tui_diffusion.families.flux import pack
from tui_diffusion.modelfiles import convert_dit
from tui_diffusion.modelfiles.header import read_header
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import models_dit as md

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny Flux files (dev and schnell transformers, VAE, text encoders) and a dev all-in-one
    checkpoint in fp8."""
    root = shared_models(tmp_path_factory)
    out = {"dev": root / "diffusion_models" / "flux1-dev.safetensors",
           "schnell": root / "diffusion_models" / "flux1-schnell.safetensors",
           "vae": root / "vae" / "ae.safetensors",
           "checkpoint": w.write_flux_checkpoint(Path(tmp_path_factory.mktemp("flux")) / "flux1-dev-fp8.safetensors",
                                                 dtype="fp8_e4m3fn")}
    out.update({name: root / "text_encoders" / f"{stem}.safetensors"
                for name, stem in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16"))})
    return out


@pytest.fixture(scope="module")
def clip(files: dict[str, Path]) -> md.DitClip:
    return md.load_text_encoders([files["t5xxl"], files["clip_l"]], "flux", CPU)


def _model(path: Path):
    kind, transformer = md.load_transformer(md.TensorReader(path), CPU)
    return md.model_handle(kind, transformer, CPU, str(path))


def test_recognised_from_its_header(files: dict[str, Path]) -> None:
    for name in ("dev", "schnell", "checkpoint"):
        assert detect(read_header(files[name])).id == "flux"


def test_full_size_configs_are_what_the_shapes_say() -> None:
    from diffusers import FluxTransformer2DModel

    from tui_diffusion.modelfiles.header import TensorInfo

    for name, guidance in (("flux1-dev", True), ("flux1-schnell", False)):
        shipped = convert_dit.shipped_config(name)
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(shipped)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=0.01)
        header = {k: TensorInfo("BF16", tuple(v.shape))
                  for k, v in w.flux_to_original(model.state_dict(), 19, 38).items()}
        derived = convert_dit.flux_config(header, name)
        assert derived["guidance_embeds"] is guidance
        assert {k: v for k, v in derived.items() if k in shipped and k != "out_channels"} == \
            {k: v for k, v in shipped.items() if k != "out_channels"}
        assert derived["out_channels"] == 64


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_transformer_output_equals_diffusers(files: dict[str, Path], variant: str) -> None:
    """Our conversion and model call (packing, positions, guidance) against diffusers' converter and model."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    model = _model(files[variant])
    config = convert_dit.flux_config(read_header(files[variant]), variant)
    theirs = FluxTransformer2DModel.from_config(config).eval()
    theirs.load_state_dict(_diffusers_flux_converter(128 * w.TinyFlux().heads)(load_file(str(files[variant]))))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 6, generator=g)
    context, pooled = torch.randn(2, 20, 128, generator=g), torch.randn(2, 32, generator=g)
    sigma = torch.tensor([0.8, 0.3])
    entries = [(context[i:i + 1], {"pooled_output": pooled[i:i + 1], "guidance": 2.0 + i}) for i in range(2)]
    kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=(1, 16, 8, 6), negative=[False, False],
                                       device=torch.device("cpu"), dtype=torch.float32)
    assert ("guidance" in kwargs) == (variant == "dev")
    ids = torch.zeros(4 * 3, 3)
    ids[:, 1] = torch.arange(4).repeat_interleave(3).float()
    ids[:, 2] = torch.arange(3).repeat(4).float()
    with torch.no_grad():
        ours = model.family.apply_model(model, x, sigma, kwargs)
        ref = theirs(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                     img_ids=ids, txt_ids=torch.zeros(20, 3), return_dict=False,
                     guidance=torch.tensor([2.0, 3.0]) if variant == "dev" else None)[0]
    assert ours.shape == x.shape
    torch.testing.assert_close(pack(ours), ref, rtol=0, atol=0)


def test_model_sampling_defaults(files: dict[str, Path]) -> None:
    assert _model(files["dev"]).model_sampling.describe() == "FluxSampling(shift=1.15)"
    assert _model(files["schnell"]).model_sampling.describe() == "FluxSampling(shift=1)"


def test_text_conditioning_as_comfyui(clip: md.DitClip) -> None:
    emb, pooled = clip.encode_prompt(PROMPT)
    assert emb.shape == (1, 256, 128)  # T5 padded to at least 256 tokens
    assert pooled.shape == (1, 32)  # CLIP-L's pooled output, unprojected
    long_emb, _ = clip.encode_prompt(" ".join(["cat"] * 300))
    assert long_emb.shape == (1, 301, 128)  # no cut, no windows
    t5_only, pooled_other = clip.encode_flux("something else", PROMPT)
    torch.testing.assert_close(t5_only, emb)
    assert not torch.allclose(pooled_other, pooled)


def _call(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 6, generator=g)
    entries = [(torch.randn(1, 20, 128, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                       "guidance": 3.5})]
    kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=(1, 16, 8, 6), negative=[False],
                                       device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        return model.family.apply_model(model, x, torch.tensor([0.7]), kwargs)


def _fp8_upcast_reference(path: Path):
    """The same transformer with its weights rounded through fp8 (as the fp8 file holds them), upcast."""
    model = _model(path)
    with torch.no_grad():
        for param in model.unet.parameters():
            param.copy_(param.to(torch.float8_e4m3fn).float())
    return model


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_all_in_one_fp8_checkpoint(files: dict[str, Path], tmp_path: Path) -> None:
    """An fp8 file's transformer stays fp8 in memory (its matrices; norms and position embeddings in the compute
    dtype) and computes exactly as the model upcast on load would."""
    loaded = md.load_dit_checkpoint(files["checkpoint"], read_header(files["checkpoint"]), CPU, tmp_path)
    assert loaded.model.family.id == "flux" and loaded.clip.kind == "flux" and loaded.vae.latent_channels == 16
    reference = _fp8_upcast_reference(files["dev"])
    ref_state = reference.unet.state_dict()
    stored = loaded.model.unet.state_dict()
    # every linear layer's weights in fp8, the norms' own weights in the compute dtype
    assert {v.dtype for k, v in stored.items() if v.ndim >= 2} == {torch.float8_e4m3fn}
    assert {v.dtype for k, v in stored.items() if k.endswith("norm.weight")} <= {torch.float32}
    for key, value in stored.items():
        torch.testing.assert_close(value.float(), ref_state[key], rtol=0, atol=0)
    assert _bytes(loaded.model.unet) < 0.3 * _bytes(reference.unet)
    torch.testing.assert_close(_call(loaded.model), _call(reference), rtol=0, atol=0)
    assert {v.dtype for v in loaded.model.unet.state_dict().values() if v.ndim >= 2} == {
        torch.float8_e4m3fn}  # back in fp8 after the call
    from tui_diffusion.pipeline.models import load_vae

    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    alone = load_vae(files["vae"], CPU, tmp_path)
    # the checkpoint stores its VAE in fp8 too: compare with the same weights rounded the same way
    fp8_vae = w.save(w.vae16_to_original(w.build_vae16(w.FLUX_VAE_FACTORS)), tmp_path / "ae8.safetensors",
                     "fp8_e4m3fn")
    torch.testing.assert_close(loaded.vae.decode(z), load_vae(fp8_vae, CPU, tmp_path).decode(z), rtol=0, atol=0)
    assert alone.latent_channels == 16


@functools.lru_cache(maxsize=1)
def _encoders() -> dict:
    """The text encoders the tiny files hold, as transformers models (built once for the module)."""
    return w.build_text_encoders()


def _diffusers_pipeline(model):
    """diffusers' Flux pipeline on the weights of the tiny files, with a plain Euler flow scheduler that takes the
    sigmas it is given (no shift of its own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    encoders = _encoders()
    pipe = FluxPipeline(
        transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=w.build_vae16(w.FLUX_VAE_FACTORS), text_encoder=encoders["clip_l"],
        tokenizer=CLIPTokenizer.from_pretrained(str(md.config_dir("clip_tokenizer")), model_max_length=77),
        text_encoder_2=encoders["t5xxl"], tokenizer_2=md.t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sampling_matches_diffusers_pipeline(files: dict[str, Path], clip: md.DitClip, variant: str) -> None:
    """A txt2img run built from the family's hooks (Euler; dev with guidance 3.5 embedded) equals FluxPipeline's
    on the same weights, noise and sigmas."""
    from tui_diffusion.pipeline.schedules import calculate_sigmas

    model = _model(files[variant])
    sigmas = calculate_sigmas(model.model_sampling, "simple", 4)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    emb, pooled = clip.encode_prompt(PROMPT)
    ours = run(model, [[emb, {"pooled_output": pooled, "guidance": 3.5}]], None, 1.0, noise, sigmas)
    theirs = _diffusers_pipeline(model)(
        prompt=PROMPT, height=64, width=64, latents=pack(noise), sigmas=sigmas[:-1].tolist(), guidance_scale=3.5,
        max_sequence_length=256, output_type="latent").images
    torch.testing.assert_close(pack(ours), theirs, rtol=1e-4, atol=1e-4)


def test_ksampler_node_matches_diffusers_pipeline(files: dict[str, Path], clip: md.DitClip, tmp_path: Path) -> None:
    """The KSampler node (the project's sampling loop) on Flux dev with FluxGuidance at CFG 1, after
    ModelSamplingFlux: ComfyUI's seeded noise and the resolution-shifted schedule give FluxPipeline's latent."""
    from tests.test_dit_loaders import _ctx
    from tui_diffusion.pipeline.registry import implementations
    from tui_diffusion.pipeline.schedules import ksampler_sigmas

    nodes = implementations()
    ctx = _ctx(tmp_path, tmp_path)
    (model,) = nodes["ModelSamplingFlux"](ctx, model=_model(files["dev"]), max_shift=1.15, base_shift=0.5,
                                          width=64, height=64).outputs
    (latent,) = nodes["EmptySD3LatentImage"](ctx, width=64, height=64, batch_size=1).outputs
    emb, pooled = clip.encode_prompt(PROMPT)
    (positive,) = nodes["FluxGuidance"](ctx, conditioning=[[emb, {"pooled_output": pooled}]], guidance=2.5).outputs
    (out,) = nodes["KSampler"](ctx, model=model, seed=11, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                               positive=positive, negative=positive, latent_image=latent).outputs
    sigmas = ksampler_sigmas(model.model_sampling, "euler", "simple", 3, 1.0)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(11))  # ComfyUI's prepare_noise
    theirs = _diffusers_pipeline(model)(
        prompt_embeds=emb, pooled_prompt_embeds=pooled, height=64, width=64, latents=pack(noise),
        sigmas=sigmas[:-1].tolist(), guidance_scale=2.5, output_type="latent").images
    torch.testing.assert_close(pack(model.family.latent_format.process_in(out["samples"])), theirs,
                               rtol=1e-4, atol=1e-4)


# -- the shipped workflows, on tiny files under the names they expect -------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_models(tmp_path_factory)


@pytest.mark.parametrize("name,latent", [("flux-schnell", "27"), ("flux-dev", "48"), ("sd3.5", "53")])
def test_shipped_workflow_runs(home: Path, tmp_path: Path, name: str, latent: str) -> None:
    """The shipped SD3.5 and Flux workflows (ComfyUI's templates' node ids) validate and run on tiny files."""
    import json

    from tests.conftest import ROOT
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    data = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    data[latent]["inputs"].update(width=64, height=64)
    for node in data.values():  # two steps are enough to run every node
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    paths = ModelPaths(home)
    assert not validate_workflow(Workflow.from_data(data), paths)
    engine = EngineState(CPU, ModelCache(4), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(data, Hooks(), lambda: False)
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


# -- the variants with the same transformer: Fill, Canny/Depth, Kontext ------------------------------------------------
@pytest.fixture(scope="module")
def fill(tmp_path_factory: pytest.TempPathFactory):
    return _model(shared_models(tmp_path_factory) / "diffusion_models" / "flux1-fill-dev.safetensors")


def test_fill_inputs_are_diffusers_fill_pipeline_inputs(fill) -> None:
    """InpaintModelConditioning's image latent and mask become the Fill model's 80 extra channels exactly as
    FluxFillPipeline packs its masked-image latents and mask (ComfyUI's layout: 8x8 mask pixels per cell)."""
    from types import SimpleNamespace

    from diffusers import FluxFillPipeline

    g = torch.Generator().manual_seed(4)
    x, image = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 16, 8, 6, generator=g)
    mask = torch.rand(1, 1, 64, 48, generator=g)
    context, pooled = torch.randn(1, 20, 128, generator=g), torch.randn(1, 32, generator=g)
    shim = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159)),
                           vae_scale_factor=8, _pack_latents=FluxFillPipeline._pack_latents)
    packed_mask, packed_image = FluxFillPipeline.prepare_mask_latents(shim, mask, image, 1, 16, 1, 64, 48,
                                                                      torch.float32, torch.device("cpu"), None)
    masked_latents = torch.cat([packed_image, packed_mask], dim=-1)  # as FluxFillPipeline joins them
    entries = [(context, {"pooled_output": pooled, "guidance": 30.0, "concat_latent_image": image,
                          "concat_mask": mask})]
    kwargs = fill.family.model_kwargs(fill, entries, batch=1, latent_shape=tuple(x.shape), negative=[False],
                                      device=torch.device("cpu"), dtype=torch.float32)
    default = fill.family.extra_channels(fill, x, None)
    assert default.shape == (1, 80, 8, 6)
    sigma = torch.tensor([0.7])
    ids = torch.zeros(12, 3)
    ids[:, 1] = torch.arange(4).repeat_interleave(3).float()
    ids[:, 2] = torch.arange(3).repeat(4).float()
    with torch.no_grad():
        ours = fill.family.apply_model(fill, torch.cat([x, default], 1), sigma, kwargs)
        theirs = fill.unet(hidden_states=torch.cat([pack(x), masked_latents], dim=2), encoder_hidden_states=context,
                           pooled_projections=pooled, timestep=sigma, img_ids=ids, txt_ids=torch.zeros(20, 3),
                           guidance=torch.tensor([30.0]), return_dict=False)[0]
    torch.testing.assert_close(pack(ours), theirs, rtol=0, atol=0)


def test_kontext_reference_latent_is_diffusers_kontext_call(files: dict[str, Path]) -> None:
    """A ReferenceLatent joins the image tokens at index 1 (FluxKontextPipeline's ids) and only the image's own
    tokens come out; a second reference goes beside or below the first (ComfyUI's 'offset' method)."""
    from tui_diffusion.families.flux import reference_offsets
    from tui_diffusion.pipeline.registry import implementations

    model = _model(files["dev"])
    g = torch.Generator().manual_seed(5)
    x, ref = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 16, 6, 10, generator=g)
    context, pooled = torch.randn(1, 20, 128, generator=g), torch.randn(1, 32, generator=g)
    (cond,) = implementations()["ReferenceLatent"](None, conditioning=[[context, {"pooled_output": pooled}]],
                                                   latent={"samples": ref}).outputs
    kwargs = model.family.model_kwargs(model, [tuple(c) for c in cond], batch=1, latent_shape=tuple(x.shape),
                                       negative=[False], device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.zeros(12, 3)
    ids[:, 1] = torch.arange(4).repeat_interleave(3).float()
    ids[:, 2] = torch.arange(3).repeat(4).float()
    ref_ids = torch.zeros(15, 3)
    ref_ids[:, 0] = 1
    ref_ids[:, 1] = torch.arange(3).repeat_interleave(5).float()
    ref_ids[:, 2] = torch.arange(5).repeat(3).float()
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        ours = model.family.apply_model(model, x, sigma, kwargs)
        theirs = model.unet(hidden_states=torch.cat([pack(x), pack(model.family.latent_format.process_in(ref))], 1),
                            encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                            img_ids=torch.cat([ids, ref_ids]), txt_ids=torch.zeros(20, 3),
                            guidance=torch.tensor([3.5]), return_dict=False)[0][:, :12]
    torch.testing.assert_close(pack(ours), theirs, rtol=0, atol=0)
    tall, wide = torch.zeros(1, 16, 10, 4), torch.zeros(1, 16, 4, 10)
    assert reference_offsets([ref, tall]) == [(0, 0), (0, 10)]  # taller than the extent so far: to the right
    assert reference_offsets([ref, wide]) == [(0, 0), (6, 0)]  # else below


def test_kontext_image_scale_and_instruct_pix2pix_conditioning(tmp_path: Path) -> None:
    from tui_diffusion.pipeline.registry import implementations

    nodes = implementations()
    (scaled,) = nodes["FluxKontextImageScale"](None, image=torch.rand(1, 48, 40, 3)).outputs
    assert scaled.shape == (1, 1104, 944, 3)  # the Kontext size nearest 40:48
    vae = SimpleVae()
    pos, neg, latent = nodes["InstructPixToPixConditioning"](None, positive=[[torch.ones(1, 2, 3), {}]],
                                                             negative=[[torch.zeros(1, 2, 3), {}]], vae=vae,
                                                             pixels=torch.rand(1, 44, 36, 3)).outputs
    assert vae.seen == [(1, 40, 32, 3)]  # cut to a multiple of 8, centred
    assert latent["samples"].shape == (1, 16, 5, 4) and not latent["samples"].any()
    assert pos[0][1]["concat_latent_image"] is neg[0][1]["concat_latent_image"]


class SimpleVae:
    """A VAE stand-in: the latent is the image's mean colour per 8x8 cell, 16 channels."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(pixels.shape))
        cells = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).mean(1, keepdim=True)
        return cells.repeat(1, 16, 1, 1)


@pytest.mark.parametrize("strength", [None, 1.0, 0.5])
def test_differential_diffusion_masks_by_schedule_share(files: dict[str, Path], clip: md.DitClip, tmp_path: Path,
                                                        strength: float | None) -> None:
    """With a soft noise mask of 0.3 and one step, DifferentialDiffusion denoises nothing (only mask values at
    least the remaining schedule share, 1 at the first step, are sampled); at strength 0.5 the mask is 0.15."""
    from tests.test_dit_loaders import _ctx
    from tui_diffusion.pipeline.registry import implementations

    nodes = implementations()
    ctx = _ctx(tmp_path, tmp_path)
    model = _model(files["dev"])
    if strength is not None:
        (model,) = nodes["DifferentialDiffusion"](ctx, model=model, strength=strength).outputs
    emb, pooled = clip.encode_prompt(PROMPT)
    samples = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    latent = {"samples": samples, "noise_mask": torch.full((1, 1, 8, 8), 0.3)}
    cond = [[emb, {"pooled_output": pooled}]]
    (out,) = nodes["KSampler"](ctx, model=model, seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                               positive=cond, negative=cond, latent_image=latent).outputs
    changed = (out["samples"] - samples).abs().max()
    if strength == 1.0:
        assert changed < 1e-5  # the input latent, through the latent format and back
    else:
        assert changed > 1e-3

"""CLIP vision, style models (Flux Redux) and unCLIP (issue 16 item 5) on tiny random-weight files in the layouts
they are published in: the encoder's outputs equal transformers' model on the same weights, Redux appends the
image's tokens with its strength, unCLIP conditioning reaches the UNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dit_helpers import CPU
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline import checkpoint_writer_vision as w
from tui_diffusion.pipeline.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ClipVisionOutput,
    load_clip_vision,
    load_style_model,
    preprocess,
)

SIZES = w.TinyVision()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Two images of another size and shape than the encoder's (so scaling and cropping happen)."""
    return torch.rand(2, 40, 50, 3, generator=torch.Generator().manual_seed(0))


# -- CLIPVisionLoader / CLIPVisionEncode ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "hf-bare", "openclip"])
def test_clip_vision_encoding_equals_transformers(tmp_path: Path, image: torch.Tensor, layout: str) -> None:
    """Each file layout loads into the same model: last and penultimate hidden states and image embeddings equal
    CLIPVisionModelWithProjection's on the same pixels."""
    model = w.build_clip_vision(SIZES, seed=1)
    path = w.save(w.clip_vision_keys(model, layout), tmp_path / "clip_vision_h.safetensors")
    vision = load_clip_vision(path, CPU)
    assert (vision.config.kind, vision.config.image_size, vision.config.layers) == ("clip", 28, 3)
    out = vision.encode(image, crop=True)
    with torch.no_grad():
        ref = model(pixel_values=preprocess(image, 28, CLIP_MEAN, CLIP_STD, True), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, ref.hidden_states[-2])
    torch.testing.assert_close(out.image_embeds, ref.image_embeds)
    assert out.image_embeds.shape == (2, SIZES.projection_dim)
    assert out["image_embeds"] is out.image_embeds  # ComfyUI's item access


def test_siglip_encoding_equals_transformers(tmp_path: Path, image: torch.Tensor) -> None:
    """SigLIP (Redux's encoder, ``vision_model.*`` keys): 0.5 mean/std, no class token, the last hidden state after
    the final norm, and image_embeds the normed tokens (ComfyUI has no projection for SigLIP)."""
    model = w.build_siglip_vision(SIZES, seed=2)
    path = w.save(w.siglip_keys(model), tmp_path / "sigclip_vision_patch14_384.safetensors")
    vision = load_clip_vision(path, CPU)
    assert vision.config.kind == "siglip" and vision.config.mean == SIGLIP_MEAN
    out = vision.encode(image, crop=False)
    with torch.no_grad():
        ref = model(pixel_values=preprocess(image, 28, SIGLIP_MEAN, SIGLIP_STD, False), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, ref.hidden_states[-2])
    assert out.last_hidden_state.shape == (2, 16, SIZES.width)
    torch.testing.assert_close(out.image_embeds, out.last_hidden_state)


@pytest.mark.parametrize("width, layers, mlp, positions, projection, want", [
    (1024, 24, 4096, 257, 768, ("clip", 16, 224, "quick_gelu")),  # OpenAI ViT-L/14
    (1024, 24, 4096, 577, 768, ("clip", 16, 336, "quick_gelu")),  # ViT-L/14 at 336 px
    (1280, 32, 5120, 257, 1024, ("clip", 16, 224, "gelu")),  # LAION ViT-H/14 (SD2.1 unCLIP, IP-Adapter)
    (1664, 48, 8192, 257, 1280, ("clip", 16, 224, "gelu")),  # ViT-bigG/14 (SDXL revision)
    (1152, 27, 4304, 729, None, ("siglip", 16, 384, "gelu_pytorch_tanh")),  # SigLIP so400m/14 at 384 (Redux)
])
def test_full_size_configs_from_shapes(width: int, layers: int, mlp: int, positions: int, projection: int | None,
                                       want: tuple) -> None:
    """The published towers' configurations from their tensor shapes alone (no weights are read)."""
    from tui_diffusion.pipeline.clip_vision import vision_config

    meta = {"device": "meta"}
    tower = {"embeddings.patch_embedding.weight": torch.empty(width, 3, 14, 14, **meta),
             "embeddings.position_embedding.weight": torch.empty(positions, width, **meta)}
    if want[0] == "clip":
        tower["embeddings.class_embedding"] = torch.empty(width, **meta)
    tower.update({f"encoder.layers.{i}.mlp.fc1.weight": torch.empty(mlp, width, **meta) for i in range(layers)})
    config = vision_config(tower, torch.empty(projection, width, **meta) if projection else None)
    hf = config.transformers_config()
    assert (config.kind, config.heads, config.image_size, hf.hidden_act) == want
    assert (config.layers, config.intermediate, config.projection_dim) == (layers, mlp, projection)
    assert (hf.image_size // hf.patch_size) ** 2 + (want[0] == "clip") == positions


def test_preprocess_crop_center_and_none() -> None:
    """ComfyUI's clip_preprocess: "center" scales the short side and cuts the middle; "none" squashes. A wide
    image, white in its outer quarters and black in the middle half, shows which one happened."""
    img = torch.zeros(1, 20, 40, 3)
    img[:, :, :10] = img[:, :, 30:] = 1.0
    centre = preprocess(img, 10, (0.0,) * 3, (1.0,) * 3, crop=True)
    squashed = preprocess(img, 10, (0.0,) * 3, (1.0,) * 3, crop=False)
    assert centre.shape == squashed.shape == (1, 3, 10, 10)
    assert float(centre[..., 3:7].max()) < 0.02  # the middle half, black (only its edges see the blur)
    assert float(squashed[..., :2].min()) > 0.9 and float(squashed[..., -2:].min()) > 0.9  # both white quarters
    # at the encoder's size nothing is resized; values are quantised to 8 bits
    same = torch.rand(1, 10, 10, 3)
    torch.testing.assert_close(preprocess(same, 10, (0.0,) * 3, (1.0,) * 3), (same * 255).round().movedim(-1, 1) / 255)


def test_not_an_image_encoder_is_a_clear_error(tmp_path: Path) -> None:
    path = w.save({"something.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: no CLIP vision"):
        load_clip_vision(path, CPU)
    pickle = tmp_path / "clip.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="refused"):
        load_clip_vision(pickle, CPU)


# -- StyleModelLoader / StyleModelApply (Flux Redux) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def redux(tmp_path_factory: pytest.TempPathFactory, image: torch.Tensor) -> tuple:
    """A tiny SigLIP encoder's output for the two images and a Redux projector to a 128-wide text."""
    root = Path(tmp_path_factory.mktemp("redux"))
    vision = load_clip_vision(w.write_siglip_vision(root / "sigclip.safetensors", SIZES, seed=3), CPU)
    style = load_style_model(w.write_redux(root / "flux1-redux-dev.safetensors", SIZES.width, 128, seed=4), CPU)
    return vision.encode(image), style, root


def _text(tokens: int = 5) -> list:
    gen = torch.Generator().manual_seed(5)
    return [[torch.randn(1, tokens, 128, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]]


def test_redux_appends_every_images_tokens(redux: tuple) -> None:
    """Redux's tokens (up, SiLU, down of SigLIP's last hidden state) of both images follow the prompt's tokens in
    one row; the prompt's own tokens and extras stay; chaining appends again."""
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    output, style, _ = redux
    text = _text()
    (out,) = style_model_apply(None, text, style, output, 1.0, "multiply").outputs
    emb, extras = out[0]
    assert emb.shape == (1, 5 + 2 * 16, 128)
    torch.testing.assert_close(emb[:, :5], text[0][0])
    m = style.module
    with torch.no_grad():
        want = m.redux_down(torch.nn.functional.silu(m.redux_up(output.last_hidden_state))).reshape(1, 32, 128)
    torch.testing.assert_close(emb[:, 5:], want)
    assert extras["pooled_output"] is text[0][1]["pooled_output"] and "attention_mask" not in extras
    (chained,) = style_model_apply(None, out, style, output, 1.0, "multiply").outputs
    assert chained[0][0].shape[1] == 5 + 64


def test_redux_strength_multiply_scales_the_tokens(redux: tuple) -> None:
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    output, style, _ = redux
    (full,) = style_model_apply(None, _text(), style, output, 1.0, "multiply").outputs
    (half,) = style_model_apply(None, _text(), style, output, 0.25, "multiply").outputs
    torch.testing.assert_close(half[0][0][:, 5:], full[0][0][:, 5:] * 0.25)
    torch.testing.assert_close(half[0][0][:, :5], full[0][0][:, :5])


def test_redux_strength_attn_bias_records_comfyui_mask(redux: tuple) -> None:
    """attn_bias leaves the tokens as they are and biases attention to them by log(strength): ComfyUI's mask over
    text, Redux tokens and one cell standing for the image (strength 1 adds no mask)."""
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    output, style, _ = redux
    (plain,) = style_model_apply(None, _text(), style, output, 1.0, "attn_bias").outputs
    assert "attention_mask" not in plain[0][1]
    (biased,) = style_model_apply(None, _text(), style, output, 0.5, "attn_bias").outputs
    emb, extras = biased[0]
    torch.testing.assert_close(emb, plain[0][0])
    mask = extras["attention_mask"].float()
    assert mask.shape == (1, 5 + 32 + 1, 5 + 32 + 1) and extras["attention_mask_img_shape"] == (1, 1)
    bias = torch.log(torch.tensor(0.5)).half().float()
    assert bool((mask[:, :5, 5:37] == bias).all()) and bool((mask[:, 37:, 5:37] == bias).all())
    mask[:, :5, 5:37] = mask[:, 37:, 5:37] = 0
    assert not mask.any()  # the rest: no bias (the Redux tokens' own rows included)


def test_style_model_errors_are_clear(redux: tuple, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    output, style, _ = redux
    narrow = ClipVisionOutput(output.last_hidden_state[..., :16], output.penultimate_hidden_states,
                              output.image_embeds)
    with pytest.raises(NodeError, match="sigclip_vision_patch14_384"):
        style_model_apply(None, _text(), style, narrow, 1.0, "multiply")
    with pytest.raises(NodeError, match="connect a CLIPVisionEncode"):
        style_model_apply(None, _text(), style, "x", 1.0, "multiply")
    bad = w.save({"something.weight": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a style model"):
        load_style_model(bad, CPU)


# -- unCLIPConditioning: SDXL revision ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI's revision template's files: a tiny SDXL base and a CLIP-G-like image encoder whose projection is
    as wide as the SDXL's pooled text (1280 in the real ones)."""
    from tui_diffusion.pipeline.checkpoint_writer import TinySDXL, write_sdxl_checkpoint

    root = Path(tmp_path_factory.mktemp("revision"))
    write_sdxl_checkpoint(root / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors")
    sizes = w.TinyVision(projection_dim=TinySDXL().clip_g_width)
    w.write_clip_vision(root / "models" / "clip_vision" / "clip_vision_g.safetensors", sizes, seed=6)
    return root


def _alphas_cumprod() -> torch.Tensor:
    """The noise augmentor's schedule from diffusers (squared cosine, 1000 steps), independently of the code."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod


@pytest.fixture(scope="module")
def sdxl_model(sdxl: Path) -> object:
    from tui_diffusion.pipeline.models import load_checkpoint

    return load_checkpoint(sdxl / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors", CPU, sdxl / "cfg").model


def test_revision_replaces_sdxl_pooled_text_with_noised_image_embedding(sdxl: Path, sdxl_model: object,
                                                                         image: torch.Tensor) -> None:
    """ComfyUI's sdxl_pooled: with unCLIP conditioning the pooled vector SDXL's UNet takes is the image embedding,
    noised to the augmentation's level with the sampler's seed - 10 and weighted by the strength; the UNet's
    input and output change; conditioning without it keeps its pooled text."""
    from tui_diffusion.pipeline.clip_vision import resolve_unclip
    from tui_diffusion.pipeline.nodes_vision import unclip_conditioning

    model = sdxl_model
    output = load_clip_vision(sdxl / "models" / "clip_vision" / "clip_vision_g.safetensors", CPU).encode(image[:1])
    gen = torch.Generator().manual_seed(7)
    text = [[torch.randn(1, 77, 192, generator=gen), {"pooled_output": torch.randn(1, 128, generator=gen)}]]
    (cond,) = unclip_conditioning(None, text, output, 0.75, 0.3).outputs
    assert cond[0][1]["unclip_conditioning"][0]["strength"] == 0.75 and "unclip_conditioning" not in text[0][1]
    (resolved,) = [resolve_unclip(model, cond, seed=42)]
    level = round(999 * 0.3)
    acp = _alphas_cumprod()[level]
    noise = torch.randn((1, 128), generator=torch.Generator().manual_seed(32))
    want = (acp.sqrt() * output.image_embeds + (1 - acp).sqrt() * noise) * 0.75
    torch.testing.assert_close(resolved[0][1]["pooled_output"], want)
    assert resolve_unclip(model, text, seed=42) is text  # nothing to do without unCLIP conditioning

    kwargs = {}
    for name, entries in (("revision", resolved), ("text", text)):
        kwargs[name] = model.family.model_kwargs(model, [tuple(e) for e in entries], batch=1,
                                                 latent_shape=(1, 4, 8, 8), negative=[False], device="cpu",
                                                 dtype=torch.float32)
    torch.testing.assert_close(kwargs["revision"]["added_cond_kwargs"]["text_embeds"], want)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        outs = [model.family.apply_model(model, x, torch.tensor([500.0]), kwargs[n]) for n in ("revision", "text")]
    assert not torch.allclose(outs[0], outs[1])
    # strength 0 leaves the conditioning as it is, as in ComfyUI
    assert unclip_conditioning(None, text, output, 0.0, 0.3).outputs[0] is text


def test_revision_with_two_images_sums_and_noises_again(sdxl: Path, sdxl_model: object, image: torch.Tensor) -> None:
    """Two unCLIPConditioning nodes chained (the revision template): each image noised at its own level and
    weighted, the sum noised once more at level 0 (SDXL's merge level), reproducibly for a seed."""
    from tui_diffusion.pipeline.clip_vision import resolve_unclip
    from tui_diffusion.pipeline.nodes_vision import unclip_conditioning

    vision = load_clip_vision(sdxl / "models" / "clip_vision" / "clip_vision_g.safetensors", CPU)
    first, second = vision.encode(image[:1]), vision.encode(image[1:])
    text = [[torch.zeros(1, 77, 192), {"pooled_output": torch.zeros(1, 128)}]]
    (cond,) = unclip_conditioning(None, text, first, 0.75, 0.0).outputs
    (cond,) = unclip_conditioning(None, cond, second, 0.5, 0.1).outputs
    pooled = resolve_unclip(sdxl_model, cond, seed=20)[0][1]["pooled_output"]
    torch.testing.assert_close(resolve_unclip(sdxl_model, cond, seed=20)[0][1]["pooled_output"], pooled)
    acp = _alphas_cumprod()

    def noised(x: torch.Tensor, level: int) -> torch.Tensor:
        noise = torch.randn((1, 128), generator=torch.Generator().manual_seed(10))
        return acp[level].sqrt() * x + (1 - acp[level]).sqrt() * noise

    total = noised(first.image_embeds, 0) * 0.75 + noised(second.image_embeds, round(999 * 0.1)) * 0.5
    torch.testing.assert_close(pooled, noised(total, 0))


def test_ksampler_samples_with_revision(sdxl: Path, sdxl_model: object, image: torch.Tensor, tmp_path: Path) -> None:
    """The sampler resolves unCLIP conditioning with its seed: revision changes KSampler's latent, the same seed
    gives the same latent."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.ksampler import ksampler
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.pipeline.nodes_vision import unclip_conditioning

    engine = EngineState(CPU, ModelCache(1), ModelPaths(sdxl / "models"), tmp_path, tmp_path, tmp_path)
    ctx = NodeContext(engine, "3", {}, lambda *a: None, lambda: False)
    output = load_clip_vision(sdxl / "models" / "clip_vision" / "clip_vision_g.safetensors", CPU).encode(image[:1])
    gen = torch.Generator().manual_seed(8)
    text = [[torch.randn(1, 77, 192, generator=gen), {"pooled_output": torch.randn(1, 128, generator=gen)}]]
    (revision,) = unclip_conditioning(None, text, output, 1.0, 0.1).outputs
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(positive: list) -> torch.Tensor:
        return ksampler(ctx, sdxl_model, 5, 1, 1.0, "euler", "normal", positive, text, latent)["samples"]

    with_image, again, without = sample(revision), sample(revision), sample(text)
    torch.testing.assert_close(with_image, again)
    assert not torch.allclose(with_image, without)


def test_unclip_on_a_model_without_image_embedding_is_a_clear_error(redux: tuple) -> None:
    from types import SimpleNamespace

    from tui_diffusion.pipeline.clip_vision import resolve_unclip
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.nodes_vision import unclip_conditioning

    output, _, _ = redux
    (cond,) = unclip_conditioning(None, _text(), output, 1.0, 0.0).outputs
    sd1 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_embed_type=None,
                                                                      class_embed_type=None)),
                          family=SimpleNamespace(label="SD1.x"))
    with pytest.raises(NodeError, match="SD1.x model takes no image embedding"):
        resolve_unclip(sd1, cond, seed=0)


def test_sdxl_revision_template_runs(sdxl: Path, tmp_path: Path) -> None:
    """ComfyUI's sdxl_revision_text_prompts template (copied unchanged): two images' CLIP-G embeddings through
    unCLIPConditioning into SDXL's KSampler, on the tiny files under the names it expects."""
    import json

    import numpy as np
    from PIL import Image

    from tui_diffusion.graph.ui_format import ui_to_api
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    data = Path(__file__).parent / "data" / "templates" / "sdxl_revision_text_prompts.json"
    api = ui_to_api(json.loads(data.read_text(encoding="utf-8")), "revision")
    assert [n for n in api if api[n]["class_type"] == "unCLIPConditioning"]
    api["5"]["inputs"].update({"width": 64, "height": 64})
    api["3"]["inputs"].update({"steps": 1})
    (tmp_path / "input").mkdir()
    rng = np.random.default_rng(1)
    for name in ("sdxl_revision_text_prompts_ref_image1.png", "sdxl_revision_text_prompts_ref_image2.png"):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "input" / name)
    paths = ModelPaths(sdxl / "models", input_dir=tmp_path / "input")
    assert not validate_workflow(Workflow.from_data(api), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and np.asarray(Image.open(saved[0])).std() > 0


def test_redux_attn_bias_reaches_flux_attention(redux: tuple) -> None:
    """The Flux family turns attn_bias's mask into an attention bias: strength 0 (bias -inf) gives the image
    exactly what the prompt alone gives, strength 1 what multiply gives, 0.5 something between; the mask's
    one image cell spreads over every image token (an odd latent: the grid after padding)."""
    from tui_diffusion.pipeline import checkpoint_writer_dit as wd
    from tui_diffusion.pipeline import models_dit as md
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    output, style, root = redux
    path = wd.write_flux_transformer(root / "flux1-dev.safetensors")
    kind, transformer = md.load_transformer(md.TensorReader(path), CPU)
    model = md.model_handle(kind, transformer, CPU, str(path))
    family = model.family
    x = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(9))

    def run(*conds: list) -> torch.Tensor:
        entries = [tuple(c[0]) for c in conds]
        kwargs = family.model_kwargs(model, entries, batch=1, latent_shape=tuple(x.shape),
                                     negative=[False] * len(entries), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            return family.apply_model(model, x.repeat(len(entries), 1, 1, 1), torch.tensor([0.7]), kwargs)

    text = _text()
    text[0][1]["pooled_output"] = torch.randn(1, 32, generator=torch.Generator().manual_seed(10))
    apply = {(s, kind): style_model_apply(None, text, style, output, s, kind).outputs[0]
             for s, kind in ((0.0, "attn_bias"), (1.0, "attn_bias"), (0.5, "attn_bias"), (1.0, "multiply"))}
    alone = run(text)
    torch.testing.assert_close(run(apply[0.0, "attn_bias"]), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(apply[1.0, "attn_bias"]), run(apply[1.0, "multiply"]))
    half = run(apply[0.5, "attn_bias"])
    assert not torch.allclose(half, alone, atol=1e-4) and not torch.allclose(half, run(apply[1.0, "multiply"]),
                                                                             atol=1e-4)
    # in one batch with a prompt of another length (contexts repeated to a common length) the mask follows the
    # repeated tokens of its own row, and the other row runs unmasked
    both = run(apply[0.0, "attn_bias"], text)
    assert bool(torch.isfinite(both).all())
    assert not torch.allclose(both[:1], run(apply[1.0, "multiply"], text)[:1], atol=1e-4)
    torch.testing.assert_close(both[1:], run(apply[1.0, "multiply"], text)[1:])


# -- SD2.1 unCLIP: unCLIPCheckpointLoader and unCLIPConditioning through the class embedding --------------------------
@pytest.fixture(scope="module")
def unclip(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny SD2.1 unCLIP checkpoint loaded by the node: (engine, outputs, file)."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.pipeline.nodes_vision import unclip_checkpoint_loader

    root = Path(tmp_path_factory.mktemp("unclip"))
    path = w.write_sd21_unclip_checkpoint(root / "models" / "checkpoints" / "sd21-unclip-h.safetensors")
    engine = EngineState(CPU, ModelCache(4), ModelPaths(root / "models"), root / "out", root / "tmp", root / "cfg")
    ctx = NodeContext(engine, "1", {}, lambda *a: None, lambda: False)
    return engine, unclip_checkpoint_loader(ctx, path.name).outputs, path, ctx


def test_unclip_checkpoint_loader_gives_model_and_image_encoder(unclip: tuple, image: torch.Tensor) -> None:
    """The file's UNet has the projection class embedding (v-prediction), and its open_clip image encoder under
    embedder.model.visual. encodes as transformers' model of the same weights."""
    _, (model, clip, vae, vision), path, _ = unclip
    assert model.family.id == "sd2-unclip" and model.unet.config.class_embed_type == "projection"
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.unet.config.projection_class_embeddings_input_dim == 2 * SIZES.projection_dim
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the class embedding is the file's label_emb
        for ours, theirs in (("linear_1.weight", "0.0.weight"), ("linear_2.bias", "0.2.bias")):
            torch.testing.assert_close(model.unet.class_embedding.get_parameter(ours),
                                       f.get_tensor(f"model.diffusion_model.label_emb.{theirs}"))
    reference = w.build_clip_vision(SIZES, seed=3)  # the writer's encoder
    out = vision.encode(image)
    with torch.no_grad():
        ref = reference(pixel_values=preprocess(image, 28, CLIP_MEAN, CLIP_STD), output_hidden_states=True)
    torch.testing.assert_close(out.image_embeds, ref.image_embeds)


def test_unclip_conditioning_is_the_unets_class_labels(unclip: tuple, image: torch.Tensor) -> None:
    """ComfyUI's unclip_adm: the embedding normalised by the file's data mean/std, noised to the level with the
    sampler's seed - 10, denormalised, beside the level's sinusoidal embedding, times the strength: the UNet's
    class labels (zeros for a prompt without image), which change its output."""
    from tui_diffusion.pipeline.clip_vision import resolve_unclip
    from tui_diffusion.pipeline.nodes_vision import unclip_conditioning

    _, (model, _, _, vision), path, _ = unclip
    from safetensors.torch import load_file

    stats = load_file(str(path))
    mean, std = stats["noise_augmentor.data_mean"], stats["noise_augmentor.data_std"]
    output = vision.encode(image[:1])
    gen = torch.Generator().manual_seed(11)
    text = [[torch.randn(1, 77, 64, generator=gen), {}]]
    (cond,) = unclip_conditioning(None, text, output, 1.5, 0.2).outputs
    (resolved,) = [resolve_unclip(model, cond, seed=100)]
    level = round(999 * 0.2)
    acp = _alphas_cumprod()[level]
    noise = torch.randn((1, SIZES.projection_dim), generator=torch.Generator().manual_seed(90))
    z = (acp.sqrt() * (output.image_embeds - mean) / std + (1 - acp).sqrt() * noise) * std + mean
    half = SIZES.projection_dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    level_emb = torch.cat([torch.cos(level * freqs), torch.sin(level * freqs)])[None]
    want = torch.cat([z, level_emb], dim=1) * 1.5
    torch.testing.assert_close(resolved[0][1]["unclip_adm"], want)

    entries = [tuple(resolved[0]), tuple(text[0])]
    kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=(1, 4, 8, 8), negative=[False, True],
                                       device="cpu", dtype=torch.float32)
    torch.testing.assert_close(kwargs["class_labels"][0:1], want)
    assert not kwargs["class_labels"][1].any()  # no image: zeros, as ComfyUI
    x = torch.randn(1, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model.family.apply_model(model, x, torch.tensor([400.0, 400.0]), kwargs)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.slow  # two end-to-end runs, each loading the checkpoint
def test_unclip_workflow_runs_and_follows_the_image(unclip: tuple, tmp_path: Path) -> None:
    """An unCLIP workflow as ComfyUI's example builds it (unCLIPCheckpointLoader -> CLIPVisionEncode ->
    unCLIPConditioning -> KSampler) validates and runs; a different image gives a different picture."""
    import numpy as np
    from PIL import Image

    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    engine, _, path, _ = unclip
    (tmp_path / "input").mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "input" / name)
    api = {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": path.name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["2", 0],
                                                            "crop": "center"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}},
        "5": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["4", 0], "clip_vision_output": ["3", 0],
                                                              "strength": 1.0, "noise_augmentation": 0.1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 1, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "positive": ["5", 0], "negative": ["6", 0],
                                                    "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "unclip"}},
    }
    paths = ModelPaths(path.parent.parent, input_dir=tmp_path / "input")
    assert not validate_workflow(Workflow.from_data(api), paths)
    images = []
    for name in ("a.png", "b.png"):
        api["2"]["inputs"]["image"] = name
        out = tmp_path / name.removesuffix(".png")
        run_engine = EngineState(CPU, ModelCache(4), paths, out, tmp_path / "tmp", tmp_path / "cfg")
        Executor(run_engine).run(api, Hooks(), lambda: False)
        (saved,) = sorted(out.glob("*.png"))
        images.append(np.asarray(Image.open(saved)).astype(int))
    assert images[0].std() > 0 and np.abs(images[0] - images[1]).max() > 0


def test_unclip_loader_on_a_plain_checkpoint_says_so(tmp_path: Path, image: torch.Tensor) -> None:
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.nodes_vision import NoVision, clip_vision_encode

    with pytest.raises(NodeError, match="plain.safetensors holds no image encoder"):
        clip_vision_encode(None, NoVision(str(tmp_path / "plain.safetensors")), image)


def test_t2i_style_adapter_appends_its_tokens(redux: tuple, tmp_path: Path, image: torch.Tensor) -> None:
    """StyleModelLoader also loads SD1.x's T2I style adapter: its 8 learned tokens read the CLIP vision tokens
    through attention blocks (checked against torch's sequence-first MultiheadAttention, as the original runs
    them) and are appended, projected to the text width."""
    from tui_diffusion.pipeline.nodes_vision import style_model_apply

    vision = load_clip_vision(w.write_clip_vision(tmp_path / "clip_vision_l.safetensors", SIZES, seed=12), CPU)
    output = vision.encode(image)
    style = load_style_model(w.write_t2i_style(tmp_path / "coadapter-style.safetensors", text_width=48), CPU)
    text = [[torch.randn(1, 77, 48, generator=torch.Generator().manual_seed(13)), {}]]
    (out,) = style_model_apply(None, text, style, output, 1.0, "multiply").outputs
    assert out[0][0].shape == (1, 77 + 2 * 8, 48)

    sd = {k: v.float() for k, v in style.module.state_dict().items()}
    x = torch.cat([output.last_hidden_state, sd["style_embedding"].expand(2, -1, -1)], dim=1)
    x = torch.nn.functional.layer_norm(x, (32,), sd["ln_pre.weight"], sd["ln_pre.bias"]).permute(1, 0, 2)
    for i in range(3):
        p = f"transformer_layes.{i}."
        attn = torch.nn.MultiheadAttention(32, 8)
        attn.load_state_dict({k[len(p) + 5:]: v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = torch.nn.functional.layer_norm(x, (32,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        with torch.no_grad():
            x = x + attn(h, h, h, need_weights=False)[0]
        h = torch.nn.functional.layer_norm(x, (32,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]
    x = x.permute(1, 0, 2)[:, -8:]
    want = torch.nn.functional.layer_norm(x, (32,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["proj"]
    torch.testing.assert_close(out[0][0][:, 77:], want.reshape(1, 16, 48), atol=1e-5, rtol=1e-5)

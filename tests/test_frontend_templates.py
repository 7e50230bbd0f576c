"""Comfy Org's earlier published templates (``Comfy-Org/ComfyUI_frontend``'s ``public/templates``, ComfyUI_examples'
workflows saved as JSON; copied unchanged into ``tests/data/frontend_templates/``), part A: the ones without
ControlNets or adapters. Each imports from ComfyUI's UI format, validates with nothing missing and runs on tiny
random-weight files of the right architectures placed under the file names it expects (issue 16, "Done when"). The
``.ckpt``/``.pth``/``.pt`` files they name are written as pickles and run with pickles allowed, as a user would pass
``--allow-pickle``. Sizes and steps are made small with the overrides ``tui-diffusion run --set`` applies; nothing
else in the workflows is changed. Besides the images written (their number, sizes and embedded workflow), each
template's point is checked: the LoRAs, the areas, the embedding, the image inputs and the upscales really act.

Runtime: about 20 s on two cores, 40 s when they are busy (the files are written once, every run shares one
model cache).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, TINY_SD2_V, TINY_XL
from tests.dit_helpers import CPU
from tests.test_examples import _as_ckpt, check_saved
from tui_diffusion.pipeline.models import ModelCache

TEMPLATES = Path(__file__).parent / "data" / "frontend_templates"

#: template -> the inputs set small (node id -> values), as ``--set`` would; and the saved images' (width, height),
#: one per SaveImage, in the order their files are written
CASES: dict[str, tuple[dict[str, dict], list[tuple[int, int]]]] = {
    # SD1.5 txt2img
    "default": ({"5": {"width": 64, "height": 48}, "3": {"steps": 2}}, [(64, 48)]),
    # SD1.5 img2img at denoise 0.87 with dpmpp_2m: the output has the loaded image's size (64x48)
    "image2image": ({"3": {"steps": 2}}, [(64, 48)]),
    # SD2 inpainting model (9 input channels), VAEEncodeForInpaint growing LoadImage's alpha mask by 6, uni_pc_bh2
    "inpaint_example": ({"3": {"steps": 2}}, [(64, 64)]),
    # the same model outpainting: ImagePadForOutpaint adds 16 pixels above and below the 48x32 image
    "inpain_model_outpainting": ({"30": {"top": 16, "bottom": 16, "feathering": 8}, "3": {"steps": 2}},
                                 [(48, 64)]),
    "yosemite_outpaint_example": ({"30": {"top": 16, "bottom": 16, "feathering": 8}, "3": {"steps": 2}},
                                  [(48, 64)]),
    # SD1.5 with two kohya LoRAs chained (LoraLoader twice, strengths 1, 1)
    "lora_multiple": ({"5": {"width": 64, "height": 48}, "3": {"steps": 2}}, [(64, 48)]),
    # four ConditioningSetArea bands down a portrait image (the last at strength 1.5), a .ckpt with
    # CLIPSetLastLayer -2 and a separate VAE, LatentUpscale and a second pass on another checkpoint; sizes and
    # positions divided by 8, the bands' heights raised to the node's minimum (64)
    "area_composition_reversed": ({"5": {"width": 88, "height": 160}, "34": {"width": 88, "height": 64, "y": 0},
                                   "18": {"width": 88, "height": 64, "y": 40},
                                   "11": {"width": 88, "height": 64, "y": 64},
                                   "15": {"width": 88, "height": 64, "y": 88}, "22": {"width": 96, "height": 176},
                                   "3": {"steps": 2}, "24": {"steps": 2}}, [(88, 160), (96, 176)]),
    # one square area for the subject combined with the whole-image prompt, then the same two passes
    "area_composition_square_area_for_subject": ({"5": {"width": 160, "height": 88},
                                                  "46": {"width": 80, "height": 80, "y": 8},
                                                  "22": {"width": 176, "height": 96},
                                                  "3": {"steps": 2}, "24": {"steps": 2}}, [(160, 88), (176, 96)]),
    # SD2.1 v first pass, LatentUpscaleBy bislerp x1.5, a second pass on an SD1 model with CLIPSetLastLayer -2,
    # both decoded with the first checkpoint's VAE
    "latent_upscale_different_prompt_model": ({"5": {"width": 96, "height": 64}, "3": {"steps": 2},
                                               "32": {"steps": 2}}, [(96, 64), (144, 96)]),
    # SD2.1 v with a textual-inversion embedding (an A1111 .pt) named in the prompt, uni_pc_bh2
    "embedding_example": ({"5": {"width": 64, "height": 64}, "3": {"steps": 2}}, [(64, 64)]),
    # SD1.5 from a .ckpt, the image upscaled x4 by RealESRGAN_x4plus.pth (Real-ESRGAN's params_ema layout)
    "esrgan_example": ({"5": {"width": 32, "height": 24}, "3": {"steps": 2}}, [(128, 96)]),
    # SD2.1 v: first pass, ESRGAN x4, ImageScale down to twice the first size, VAEEncode, second pass at 0.5
    "hiresfix_esrgan_workflow": ({"5": {"width": 48, "height": 48}, "3": {"steps": 2},
                                  "24": {"width": 96, "height": 96}, "11": {"steps": 2}}, [(48, 48), (96, 96)]),
    # SD2.1 v hires fix: LatentUpscale x1.5 and a second pass at denoise 0.5 with dpmpp_2m/simple
    "upscale": ({"5": {"width": 48, "height": 48}, "10": {"width": 72, "height": 72}, "3": {"steps": 2},
                 "11": {"steps": 2}}, [(48, 48), (72, 72)]),
    # SDXL revision: two images through clip_vision_g and chained unCLIPConditioning on a zeroed-out empty prompt,
    # dpmpp_3m_sde_gpu with the exponential schedule
    "sdxl_revision_zero_positive": ({"5": {"width": 64, "height": 64}, "3": {"steps": 2}}, [(64, 64)]),
}

needs_spandrel = pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                                    reason="spandrel (the upscale extra) is not installed")
UPSCALING = {"esrgan_example", "hiresfix_esrgan_workflow"}


def _write_real_esrgan(path: Path) -> None:
    """A tiny ESRGAN x4 saved as RealESRGAN_x4plus.pth is: Real-ESRGAN's key names under ``params_ema``."""
    from tests.test_upscale import to_real_esrgan_keys
    from tui_diffusion.pipeline.upscale import spandrel_module

    spandrel_module()
    from spandrel.architectures import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN.ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": to_real_esrgan_keys(model.state_dict())}, path)


def _write_a1111_embedding(path: Path, checkpoint: Path, words: str, cfg: Path) -> None:
    """An A1111 textual-inversion .pt (``string_to_param``) whose vectors are the checkpoint's own token embeddings
    of ``words``: the prompt with the embedding must encode as the prompt with the words."""
    from tui_diffusion.pipeline.models import load_checkpoint

    (enc,) = load_checkpoint(checkpoint, CPU, cfg, True).clip.encoders
    ids = enc.tokenizer(words, add_special_tokens=False).input_ids
    vectors = enc.model.get_input_embeddings().weight.detach()[ids].clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 1},
               path)


#: the words the embedding's vectors spell
EMBEDDED_WORDS = "red cat"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A models folder and an input folder holding what the templates name."""
    from tui_diffusion.pipeline.checkpoint_writer import (
        TinySD1,
        TinySD2,
        TinySDXL,
        build_sd1_models,
        write_kohya_lora,
        write_sd2_checkpoint,
    )
    from tui_diffusion.pipeline.checkpoint_writer_lotus import write_sd_vae
    from tui_diffusion.pipeline.checkpoint_writer_vision import TinyVision, write_clip_vision

    root = Path(tmp_path_factory.mktemp("frontend_templates"))
    models = root / "models"
    checkpoints = models / "checkpoints"
    checkpoints.mkdir(parents=True)
    tiny = models_dir / "checkpoints"
    for name, source in (("v1-5-pruned-emaonly-fp16.safetensors", TINY), ("v1-5-pruned-emaonly.safetensors", TINY),
                         ("AbyssOrangeMix2_hard.safetensors", TINY), ("cardosAnime_v10.safetensors", TINY),
                         ("wd-illusion-fp16.safetensors", TINY_SD2_V), ("v2-1_768-ema-pruned.safetensors", TINY_SD2_V),
                         ("sd_xl_base_1.0.safetensors", TINY_XL)):
        (checkpoints / name).symlink_to(tiny / source)
    work = root / "work"
    work.mkdir()
    for name in ("v1-5-pruned-emaonly.ckpt", "Anything-V3.0.ckpt"):
        copy = work / f"{name}.safetensors"
        copy.write_bytes((tiny / TINY).read_bytes())
        _as_ckpt(copy, checkpoints / name)
    write_sd2_checkpoint(checkpoints / "512-inpainting-ema.safetensors", TinySD2(in_channels=9), seed=5)
    write_sd_vae(models / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    unet, _, text = build_sd1_models(TinySD1(), seed=0)  # the architecture of the tiny SD1.5 checkpoint
    write_kohya_lora(models / "loras" / "epiNoiseoffset_v2.safetensors", unet, [text], seed=3)
    write_kohya_lora(models / "loras" / "theovercomer8sContrastFix_sd15.safetensors", unet, [text], seed=4)
    # CLIP-G's projection is as wide as SDXL's pooled text (1280 in the real ones)
    write_clip_vision(models / "clip_vision" / "clip_vision_g.safetensors",
                      TinyVision(projection_dim=TinySDXL().clip_g_width), seed=6)
    _write_a1111_embedding(models / "embeddings" / "SDA768.pt", tiny / TINY_SD2_V, EMBEDDED_WORDS, root / "cfg")
    if importlib.util.find_spec("spandrel") is not None:
        _write_real_esrgan(models / "upscale_models" / "RealESRGAN_x4plus.pth")
    rng = np.random.default_rng(0)
    (root / "input").mkdir()
    for name, (height, width) in (("example.png", (48, 64)), ("example_other.png", (48, 64)),
                                  ("sunset.png", (40, 56)), ("mountains.png", (56, 40)),
                                  ("yosemite_outpaint_example.png", (32, 48))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "input" / name)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(root / "input" / "yosemite_opaque.png")  # nothing to inpaint
    rgba[16:40, 8:48, 3] = 0  # the area to inpaint (LoadImage's mask is 1 - alpha)
    Image.fromarray(rgba).save(root / "input" / "yosemite_inpaint_example.png")
    return root


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    """One model cache for every run, as a long-running server keeps one."""
    return ModelCache(4)


def _api(name: str, changes: dict[str, dict] | None = None) -> dict:
    """The template in ComfyUI's API format with its test sizes, and ``changes`` on top."""
    from tui_diffusion.graph.ui_format import ui_to_api

    api = ui_to_api(json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8")), name)
    for node_id, values in [*CASES[name][0].items(), *(changes or {}).items()]:
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    return api


def _run(home: Path, cache: ModelCache, out: Path, api: dict) -> list[Path]:
    """Runs the workflow as the worker does; the PNGs written, in the order they were written (every SaveImage
    here has the prefix "ComfyUI", so the counter in the names gives it)."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks

    engine = EngineState(CPU, cache, ModelPaths(home / "models", input_dir=home / "input"), out, out / "tmp",
                         home / "cfg", allow_pickle=True)
    Executor(engine).run(api, Hooks(), lambda: False)
    return sorted(out.glob("*.png"))


def _pixels(files: list[Path]) -> list[np.ndarray]:
    out = []
    for file in files:
        with Image.open(file) as png:
            out.append(np.asarray(png.convert("RGB"), dtype=np.int16))
    return out


_BASE: dict[str, list[np.ndarray]] = {}


def _base(home: Path, cache: ModelCache, tmp_path: Path, name: str) -> list[np.ndarray]:
    """The template's images at its test sizes (run once per module)."""
    if name not in _BASE:
        _BASE[name] = _pixels(_run(home, cache, tmp_path / "base", _api(name)))
    return _BASE[name]


def _differs(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return any(x.shape != y.shape or np.abs(x - y).max() > 0 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_spandrel) if n in UPSCALING else n for n in CASES])
def test_template_imports_validates_and_runs(home: Path, cache: ModelCache, tmp_path: Path, name: str) -> None:
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    api = _api(name)
    paths = ModelPaths(home / "models", input_dir=home / "input")
    assert not validate_workflow(Workflow.from_data(api), paths, allow_pickle=True)
    saved = _run(home, cache, tmp_path / "out", api)
    sizes = CASES[name][1]
    assert len(saved) == len(sizes)
    assert check_saved(saved, api) == sizes
    _BASE[name] = _pixels(saved)


def test_pickle_templates_are_refused_without_allow_pickle(home: Path) -> None:
    """The .ckpt and .pth files stop at validation, naming each loader's input and the flag."""
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths

    paths = ModelPaths(home / "models", input_dir=home / "input")
    issues = validate_workflow(Workflow.from_data(_api("area_composition_reversed")), paths)
    assert [(i.node_id, i.input) for i in issues] == [("44", "ckpt_name")]
    assert "--allow-pickle" in issues[0].message
    if importlib.util.find_spec("spandrel") is not None:
        issues = validate_workflow(Workflow.from_data(_api("esrgan_example")), paths)
        assert sorted((i.node_id, i.input) for i in issues) == [("13", "model_name"), ("4", "ckpt_name")]


def test_image2image_samples_from_its_image(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """Another image loaded (same size, same seed) gives another result: the sampler starts from the image."""
    other = _pixels(_run(home, cache, tmp_path / "o", _api("image2image", {"10": {"image": "example_other.png"}})))
    assert _differs(_base(home, cache, tmp_path, "image2image"), other)


def test_inpaint_example_regenerates_only_the_masked_area(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """With a transparent area the seed changes the result; with the same image fully opaque (nothing masked) the
    seed changes nothing: the sampler keeps the unmasked latent, so the mask decides what is regenerated. (The
    opaque runs use euler, which ends exactly on the model's prediction; uni_pc_bh2 ends at sigma 0.001 as in
    ComfyUI, and the random tiny VAE magnifies that last trace of noise.)"""
    reseeded = _pixels(_run(home, cache, tmp_path / "s", _api("inpaint_example", {"3": {"seed": 1}})))
    assert _differs(_base(home, cache, tmp_path, "inpaint_example"), reseeded)
    opaque = [_pixels(_run(home, cache, tmp_path / f"o{seed}", _api("inpaint_example", {
        "20": {"image": "yosemite_opaque.png"}, "3": {"seed": seed, "sampler_name": "euler"}}))) for seed in (1, 2)]
    assert max(np.abs(a - b).max() for a, b in zip(*opaque, strict=True)) <= 1


def test_lora_multiple_applies_both_loras(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """Each LoraLoader at strength 0 (the other kept) changes the image: both LoRA files are applied."""
    base = _base(home, cache, tmp_path, "lora_multiple")
    for node_id in ("10", "11"):
        off = _api("lora_multiple", {node_id: {"strength_model": 0.0, "strength_clip": 0.0}})
        assert _differs(base, _pixels(_run(home, cache, tmp_path / node_id, off))), node_id


@pytest.mark.parametrize(("name", "changes"), [
    ("area_composition_reversed", {"15": {"y": 0}}),
    ("area_composition_square_area_for_subject", {"46": {"x": 80}}),
])
def test_moving_an_area_changes_the_image(home: Path, cache: ModelCache, tmp_path: Path, name: str,
                                          changes: dict[str, dict]) -> None:
    """The same prompts and seed with one area moved give another first-pass image: the areas are applied where
    they are set."""
    moved = _pixels(_run(home, cache, tmp_path / "m", _api(name, changes)))
    assert _differs(_base(home, cache, tmp_path, name)[:1], moved[:1])


def test_embedding_example_reads_the_a1111_embedding(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """The prompt naming ``embedding:SDA768.pt`` gives the image of the prompt with the words whose token vectors
    the file holds: the .pt embedding is read and put in the place of its name."""
    api = _api("embedding_example")
    text = api["6"]["inputs"]["text"]
    assert "embedding:SDA768.pt" in text
    spelled = _api("embedding_example", {"6": {"text": text.replace("embedding:SDA768.pt", EMBEDDED_WORDS)}})
    (as_words,) = _pixels(_run(home, cache, tmp_path / "w", spelled))
    (with_embedding,) = _base(home, cache, tmp_path, "embedding_example")
    assert np.abs(as_words - with_embedding).max() <= 1


def test_pickle_embedding_is_refused_without_allow_pickle(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """Without --allow-pickle the .pt embedding is not loaded: the run stops at the text encoder, naming the file
    and the flag."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks, JobError

    engine = EngineState(CPU, cache, ModelPaths(home / "models", input_dir=home / "input"), tmp_path / "out",
                         tmp_path / "tmp", home / "cfg")
    with pytest.raises(JobError, match=r"SDA768\.pt.*--allow-pickle") as info:
        Executor(engine).run(_api("embedding_example"), Hooks(), lambda: False)
    assert info.value.node_id == "6"


def test_revision_follows_its_images(home: Path, cache: ModelCache, tmp_path: Path) -> None:
    """With the empty prompt zeroed out the images are the only guidance: loading the second image in the place
    of the first changes the result."""
    same = _pixels(_run(home, cache, tmp_path / "s", _api("sdxl_revision_zero_positive",
                                                          {"34": {"image": "sunset.png"}})))
    assert _differs(_base(home, cache, tmp_path, "sdxl_revision_zero_positive"), same)


# -- bislerp (latent_upscale_different_prompt_model's LatentUpscaleBy) ------------------------------------------------
def test_bislerp_slerps_channel_vectors_at_bilinear_positions() -> None:
    """Two unit vectors 90 degrees apart resized from 2 to 4 wide: bilinear's sample positions (half-pixel centres,
    clamped) are 0, 1/4, 3/4 and 1 of the way, and each result is the unit vector at that angle (a linear mix
    would be shorter); the height, resized 1 -> 3, repeats the row."""
    from tui_diffusion.pipeline.nodes_latent import common_upscale

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # [N, C, H, W]: pixel 0 (1, 0), pixel 1 (0, 1)
    out = common_upscale(x, 4, 3, "bislerp", "disabled")
    assert out.shape == (1, 2, 3, 4)
    angles = torch.tensor([0.0, 0.25, 0.75, 1.0]) * torch.pi / 2
    want = torch.stack([angles.cos(), angles.sin()]).reshape(1, 2, 1, 4).expand(1, 2, 3, 4)
    torch.testing.assert_close(out, want)


def test_bislerp_interpolates_lengths_and_keeps_the_size_it_is_given() -> None:
    """Vectors of lengths 1 and 3 at right angles give lengths along the line between them; vectors pointing the
    same way give the first of the two (ComfyUI's edge case); the same size gives the latent back; the result is
    in the input's dtype; LatentUpscaleBy with it rounds the size as ComfyUI."""
    from tui_diffusion.pipeline.nodes_latent import bislerp, latent_upscale_by

    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)
    torch.testing.assert_close(bislerp(x, 4, 1).norm(dim=1).flatten(), torch.tensor([1.0, 1.5, 2.5, 3.0]))
    same_way = torch.tensor([[1.0, 1.0], [3.0, 3.0]]).T.reshape(1, 2, 1, 2)
    torch.testing.assert_close(bislerp(same_way, 4, 1), same_way[..., [0, 0, 0, 1]])
    lat = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bislerp(lat, 6, 5), lat)
    assert bislerp(lat.half(), 9, 8).dtype == torch.float16
    (up,) = latent_upscale_by(None, {"samples": lat}, "bislerp", 1.5).outputs
    assert up["samples"].shape == (2, 4, 8, 9)  # round(7.5) = 8, round(9.0) = 9


# -- pickle embeddings (embedding_example's SDA768.pt) --------------------------------------------------------------
def test_pickle_embedding_layouts_and_lookup(tmp_path: Path) -> None:
    """``embedding:name`` finds ``name.pt`` and ``name.bin`` as ComfyUI does; A1111's ``string_to_param`` and
    diffusers' ``{token: vector}`` give their vectors; anything else in a pickle is named, not loaded."""
    from tui_diffusion.pipeline.embeddings import find_embedding, load_vectors
    from tui_diffusion.pipeline.errors import NodeError

    vectors = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": "a1111"}, tmp_path / "a1111.pt")
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")
    torch.save([vectors], tmp_path / "list.pt")
    assert find_embedding(tmp_path, "a1111") == tmp_path / "a1111.pt"
    assert find_embedding(tmp_path, "learned_embeds") == tmp_path / "learned_embeds.bin"
    torch.testing.assert_close(load_vectors(tmp_path / "a1111.pt", 8, 0, allow_pickle=True), vectors)
    torch.testing.assert_close(load_vectors(tmp_path / "learned_embeds.bin", 8, 0, allow_pickle=True), vectors[:1])
    with pytest.raises(NodeError, match=r"list\.pt: not an embedding \(it holds a list\)"):
        load_vectors(tmp_path / "list.pt", 8, 0, allow_pickle=True)
    with pytest.raises(NodeError, match=r"a1111\.pt: its vectors are \[8\] wide"):
        load_vectors(tmp_path / "a1111.pt", 16, 0, allow_pickle=True)
    with pytest.raises(NodeError, match="--allow-pickle"):
        load_vectors(tmp_path / "a1111.pt", 8, 0)

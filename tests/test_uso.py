"""USO on Flux.1 dev (ComfyUI's ``flux1_dev_uso_reference_image_gen`` template) and the nodes it brings:
ModelPatchLoader reads USO's style projector in its published layout, USOStyleReference puts the projected SigLIP
layers of a style image before the prompt's tokens (position 0, as ComfyUI's post-input patch), the reference
method "uxo/uno" places reference latents diagonally past the image at index 0, and ImageScaleToMaxDimension scales
the longer side to a size. The template runs end to end on tiny files under the names it expects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.dit_helpers import CPU, shared_models
from tests.test_templates import TEMPLATES, home  # noqa: F401  (``home`` is a fixture used here)
from tui_diffusion.families.flux import pack
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import checkpoint_writer_uso as wu
from tui_diffusion.pipeline import checkpoint_writer_vision as wv
from tui_diffusion.pipeline import models_dit as md
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.nodes_latent import common_upscale
from tui_diffusion.pipeline.registry import implementations

NODES = implementations()
#: a SigLIP deep enough for USO (it reads the 20th layer from the end), as small as the other tiny encoders
SIGLIP = wv.TinyVision(layers=20)
USO = "flux1_dev_uso_reference_image_gen"


def _ids(rows: int, cols: int, index: int = 0, row0: int = 0, col0: int = 0) -> torch.Tensor:
    ids = torch.zeros(rows * cols, 3)
    ids[:, 0] = index
    ids[:, 1] = (torch.arange(rows) + row0).repeat_interleave(cols).float()
    ids[:, 2] = (torch.arange(cols) + col0).repeat(rows).float()
    return ids


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory):
    path = shared_models(tmp_path_factory) / "diffusion_models" / "flux1-dev.safetensors"
    kind, transformer = md.load_transformer(md.TensorReader(path), CPU)
    return md.model_handle(kind, transformer, CPU, str(path))


@pytest.fixture(scope="module")
def uso_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = Path(tmp_path_factory.mktemp("uso"))
    return {"projector": wu.write_uso_projector(root / "model_patches" / "uso-flux1-projector-v1.safetensors",
                                                seed=1),
            "siglip": wv.write_siglip_vision(root / "clip_vision" / "sigclip_vision_patch14_384.safetensors",
                                             SIGLIP, seed=2)}


def _cond(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 20, 128, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]


# -- ImageScaleToMaxDimension ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["area", "lanczos", "bilinear", "nearest-exact", "bicubic"])
def test_image_scale_to_max_dimension_scales_the_longer_side(method: str) -> None:
    """The longer side becomes largest_size, the other in proportion (rounded), down or up; a square image becomes
    largest_size square; the pixels are common_upscale's with that method and no crop (not clamped, as ComfyUI)."""
    node = NODES["ImageScaleToMaxDimension"]
    g = torch.Generator().manual_seed(0)
    for (h, w_, largest), expected in (((30, 50, 20), (12, 20)), ((50, 30, 20), (20, 12)), ((21, 21, 33), (33, 33)),
                                       ((10, 25, 60), (24, 60))):
        image = torch.rand(2, h, w_, 3, generator=g)
        (out,) = node(None, image=image, upscale_method=method, largest_size=largest).outputs
        assert tuple(out.shape) == (2, *expected, 3), (h, w_, largest)
        ref = common_upscale(image.movedim(-1, 1), expected[1], expected[0], method, "disabled").movedim(1, -1)
        torch.testing.assert_close(out, ref)
    with pytest.raises(NodeError, match="largest_size"):
        node(None, image=torch.rand(1, 8, 8, 3), upscale_method=method, largest_size=0)


def test_image_scale_to_max_dimension_spec_is_comfyuis() -> None:
    from tui_diffusion.graph.specs import NODE_SPECS

    spec = NODE_SPECS["ImageScaleToMaxDimension"]
    assert [(i.name, i.default) for i in spec.inputs] == [("image", None), ("upscale_method", "area"),
                                                          ("largest_size", 512)]
    assert spec.input("largest_size").min == 0 and spec.category == "image/upscaling"
    with pytest.raises(NodeError, match="upscale_method"):
        NODES["ImageScaleToMaxDimension"](None, image=torch.rand(1, 8, 8, 3), upscale_method="bislerp",
                                          largest_size=8)


# -- FluxKontextMultiReferenceLatentMethod --------------------------------------------------------------------------
def test_reference_method_node_sets_the_conditioning_value() -> None:
    node = NODES["FluxKontextMultiReferenceLatentMethod"]
    cond = _cond()
    cond[0][1]["guidance"] = 2.0
    (out,) = node(None, conditioning=cond, reference_latents_method="uxo/uno").outputs
    assert out[0][1]["reference_latents_method"] == "uxo"  # as ComfyUI stores it
    assert out[0][1]["guidance"] == 2.0 and out[0][0] is cond[0][0]
    assert "reference_latents_method" not in cond[0][1]  # the input is not changed
    for method in ("offset", "index", "index_timestep_zero"):
        assert node(None, conditioning=cond, reference_latents_method=method).outputs[0][0][1][
            "reference_latents_method"] == method
    with pytest.raises(NodeError, match="reference_latents_method"):
        node(None, conditioning=cond, reference_latents_method="diagonal")


def test_reference_methods_place_reference_latents_as_comfyui(flux) -> None:
    """Through the family's call, the reference tokens get ComfyUI's positions: "uxo" index 0, each reference
    past the image and the ones before it on both axes; "index" indices 1, 2; "offset" (no method set) index 1
    beside each other. The output equals diffusers' transformer given those ids, and only the image comes out."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 6, generator=g)  # 4 x 3 tokens
    refs = [torch.randn(1, 16, 6, 10, generator=g), torch.randn(1, 16, 4, 4, generator=g)]  # 3 x 5, 2 x 2 tokens
    cond = _cond()
    for ref in refs:
        (cond,) = NODES["ReferenceLatent"](None, conditioning=cond, latent={"samples": ref}).outputs
    expected = {
        # rows: 4 image token rows, then 6 latent rows of the first reference -> (8 + 6 + 1) // 2 = 7
        "uxo/uno": [_ids(3, 5, 0, 4, 3), _ids(2, 2, 0, 7, 8)],
        "index": [_ids(3, 5, 1), _ids(2, 2, 2)],
        "offset": [_ids(3, 5, 1), _ids(2, 2, 1, 3, 0)],  # below the first: it is not taller than the extent
    }
    sigma = torch.tensor([0.6])
    fmt = flux.family.latent_format
    outs = {}
    for method, ref_ids in expected.items():
        c = cond if method == "offset" else NODES["FluxKontextMultiReferenceLatentMethod"](
            None, conditioning=cond, reference_latents_method=method).outputs[0]
        kwargs = flux.family.model_kwargs(flux, [tuple(e) for e in c], batch=1, latent_shape=tuple(x.shape),
                                          negative=[False], device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            outs[method] = flux.family.apply_model(flux, x, sigma, kwargs)
            theirs = flux.unet(hidden_states=torch.cat([pack(x), *(pack(fmt.process_in(r)) for r in refs)], 1),
                               encoder_hidden_states=c[0][0], pooled_projections=c[0][1]["pooled_output"],
                               timestep=sigma, img_ids=torch.cat([_ids(4, 3), *ref_ids]),
                               txt_ids=torch.zeros(20, 3), guidance=torch.tensor([3.5]), return_dict=False)[0][:, :12]
        torch.testing.assert_close(pack(outs[method]), theirs, rtol=0, atol=0)
    assert not torch.allclose(outs["uxo/uno"], outs["offset"])


def test_reference_method_rows_of_one_batch_and_timestep_zero(flux) -> None:
    """A batch whose rows place references differently runs each row as it would alone; the timestep-zero method,
    which needs per-token modulation, is refused by name at sampling."""
    g = torch.Generator().manual_seed(6)
    x, ref = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 16, 6, 10, generator=g)
    (cond,) = NODES["ReferenceLatent"](None, conditioning=_cond(), latent={"samples": ref}).outputs

    def run(*conds: list) -> torch.Tensor:
        entries = [tuple(c[0]) for c in conds]
        kwargs = flux.family.model_kwargs(flux, entries, batch=1, latent_shape=tuple(x.shape),
                                          negative=[False] * len(entries), device=torch.device("cpu"),
                                          dtype=torch.float32)
        with torch.no_grad():
            return flux.family.apply_model(flux, x.repeat(len(entries), 1, 1, 1), torch.tensor([0.6]), kwargs)

    uxo = NODES["FluxKontextMultiReferenceLatentMethod"](None, conditioning=cond,
                                                         reference_latents_method="uxo/uno").outputs[0]
    both = run(uxo, cond)
    torch.testing.assert_close(both[:1], run(uxo), rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1:], run(cond), rtol=0, atol=1e-6)
    zero = NODES["FluxKontextMultiReferenceLatentMethod"](None, conditioning=cond,
                                                          reference_latents_method="index_timestep_zero").outputs[0]
    with pytest.raises(NodeError, match="index_timestep_zero"):
        run(zero)


# -- ModelPatchLoader -----------------------------------------------------------------------------------------------
def _reference_projection(state: dict[str, torch.Tensor], layers: dict[str, torch.Tensor]) -> torch.Tensor:
    """USO's projection written out from the file's tensors: per branch a linear over the tokens, SiLU, a layer
    norm over the channels, a linear to the transformer's width; high, mid, low concatenated."""
    out = []
    for name in ("high", "mid", "low"):
        p = f"feature_embedder.{name}_"
        x = layers[name].transpose(1, 2) @ state[p + "embedding_linear.0.weight"].t() + state[
            p + "embedding_linear.0.bias"]
        x = torch.nn.functional.silu(x).transpose(1, 2)
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], state[p + "layer_norm.weight"],
                                           state[p + "layer_norm.bias"], 1e-5)
        out.append(x @ state[p + "projection.weight"].t() + state[p + "projection.bias"])
    return torch.cat(out, dim=1)


def test_projector_file_has_the_published_layout_and_loads(uso_files: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from tui_diffusion.pipeline.nodes_uso import load_model_patch

    state = load_file(str(uso_files["projector"]))
    published = {f"feature_embedder.{b}_{part}.{kind}" for b in ("high", "mid", "low")
                 for part in ("embedding_linear.0", "layer_norm", "projection") for kind in ("weight", "bias")}
    assert set(state) == published
    size = wu.TinyProjector()
    assert state["feature_embedder.high_embedding_linear.0.weight"].shape == (size.style_tokens, size.vision_tokens)
    assert state["feature_embedder.low_projection.weight"].shape == (size.hidden, size.vision_width)
    patch = load_model_patch(uso_files["projector"], CPU)
    layers = {k: torch.randn(2, size.vision_tokens, size.vision_width, generator=torch.Generator().manual_seed(i))
              for i, k in enumerate(("high", "mid", "low"))}
    with torch.no_grad():
        ours = patch.module(layers)
    assert ours.shape == (2, 3 * size.style_tokens, size.hidden)
    torch.testing.assert_close(ours, _reference_projection(state, layers))


def test_model_patch_loader_names_what_it_cannot_load(tmp_path: Path) -> None:
    from tui_diffusion.pipeline.nodes_uso import load_model_patch

    qwen = w.save({"controlnet_blocks.0.y_rms.weight": torch.ones(4), "img_in.weight": torch.ones(4, 64)},
                  tmp_path / "qwen_image_canny_diffsynth_controlnet.safetensors")
    with pytest.raises(CheckpointError, match="Qwen-Image DiffSynth ControlNet"):
        load_model_patch(qwen, CPU)
    other = w.save({"something.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not a model patch"):
        load_model_patch(other, CPU)
    broken = w.save({"feature_embedder.mid_layer_norm.bias": torch.ones(2)}, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="cut.safetensors: not a usable USO style projector"):
        load_model_patch(broken, CPU)
    pickle = tmp_path / "uso.pt"
    torch.save({}, pickle)
    with pytest.raises(CheckpointError, match="refused"):
        load_model_patch(pickle, CPU)


# -- USOStyleReference ----------------------------------------------------------------------------------------------
def _style(uso_files: dict[str, Path], seed: int = 0):
    from tui_diffusion.pipeline.clip_vision import load_clip_vision
    from tui_diffusion.pipeline.nodes_uso import load_model_patch

    image = torch.rand(1, 40, 36, 3, generator=torch.Generator().manual_seed(seed))
    return load_clip_vision(uso_files["siglip"], CPU).encode(image), load_model_patch(uso_files["projector"], CPU)


def test_siglip_output_keeps_every_layer_as_comfyui(uso_files: dict[str, Path]) -> None:
    """all_hidden_states holds each encoder layer's output (not the embeddings), so index -2 is the penultimate."""
    output, _ = _style(uso_files)
    layers = output.all_hidden_states
    assert layers.shape == (1, SIGLIP.layers, 16, SIGLIP.width)
    torch.testing.assert_close(layers[:, -2], output.penultimate_hidden_states)


def test_uso_style_reference_projects_three_siglip_layers(flux, uso_files: dict[str, Path]) -> None:
    """The tokens are the projector's on the encoder's layers -20 (low), -11 (mid) and the penultimate (high);
    a second reference's tokens go before the first's; the model's weights are untouched."""
    from safetensors.torch import load_file

    output, patch = _style(uso_files)
    (one,) = NODES["USOStyleReference"](None, model=flux, model_patch=patch, clip_vision_output=output).outputs
    assert one.unet is flux.unet and flux.post_input_patches == ()
    (tokens,) = [p.tokens for p in one.post_input_patches]
    all_layers = output.all_hidden_states
    layers = {"high": all_layers[:, -2], "mid": all_layers[:, -11], "low": all_layers[:, -20]}
    torch.testing.assert_close(tokens, _reference_projection(load_file(str(uso_files["projector"])), layers))
    other, _ = _style(uso_files, seed=1)
    (two,) = NODES["USOStyleReference"](None, model=one, model_patch=patch, clip_vision_output=other).outputs
    assert len(two.post_input_patches) == 2
    kwargs = flux.family.model_kwargs(two, [tuple(_cond()[0])], batch=1, latent_shape=(1, 16, 8, 6),
                                      negative=[False], device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(kwargs["flux_txt_prefix"], torch.cat([two.post_input_patches[1].tokens, tokens], 1))


def test_uso_tokens_enter_the_transformer_before_the_text(flux, uso_files: dict[str, Path]) -> None:
    """The call equals diffusers' transformer whose embedded text tokens are [USO tokens, prompt] with their
    positions all zero (ComfyUI's post-input patch); the hook is gone afterwards and the plain model is as it
    was; USO's tokens change the image."""
    output, patch = _style(uso_files)
    (model,) = NODES["USOStyleReference"](None, model=flux, model_patch=patch, clip_vision_output=output).outputs
    tokens = model.post_input_patches[0].tokens
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 8, 6, generator=g)
    cond = _cond(3)
    sigma = torch.tensor([0.6])

    def run(m) -> torch.Tensor:
        kwargs = m.family.model_kwargs(m, [tuple(cond[0])], batch=2, latent_shape=tuple(x.shape), negative=[False],
                                       device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            return m.family.apply_model(m, x, sigma, kwargs)

    plain, ours = run(flux), run(model)
    net = flux.unet
    assert not net.context_embedder._forward_hooks
    embed = net.context_embedder

    class Prefixed(torch.nn.Module):
        def forward(self, c: torch.Tensor) -> torch.Tensor:
            return torch.cat([tokens.expand(c.shape[0], -1, -1), embed(c)], dim=1)

    n = tokens.shape[1]
    kwargs = {"encoder_hidden_states": cond[0][0].repeat(2, 1, 1),
              "pooled_projections": cond[0][1]["pooled_output"].repeat(2, 1), "timestep": sigma.expand(2),
              "img_ids": _ids(4, 3), "guidance": torch.tensor([3.5, 3.5]), "return_dict": False}
    try:
        net.context_embedder = Prefixed()
        with torch.no_grad():
            theirs = net(hidden_states=pack(x), txt_ids=torch.zeros(n + 20, 3), **kwargs)[0]
    finally:
        net.context_embedder = embed
    torch.testing.assert_close(pack(ours), theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(pack(plain), net(hidden_states=pack(x), txt_ids=torch.zeros(20, 3), **kwargs)[0],
                                   rtol=0, atol=0)
    assert not torch.allclose(ours, plain, atol=1e-4)


def test_uso_style_reference_errors_name_the_input(flux, uso_files: dict[str, Path], tmp_path: Path) -> None:
    from tui_diffusion.pipeline.clip_vision import load_clip_vision

    output, patch = _style(uso_files)
    node = NODES["USOStyleReference"]
    clip = load_clip_vision(wv.write_clip_vision(tmp_path / "clip_vision_h.safetensors"), CPU).encode(
        torch.rand(1, 28, 28, 3))
    with pytest.raises(NodeError, match="clip_vision_output: USO reads a SigLIP"):
        node(None, model=flux, model_patch=patch, clip_vision_output=clip)
    shallow = load_clip_vision(wv.write_siglip_vision(tmp_path / "shallow.safetensors"), CPU).encode(
        torch.rand(1, 28, 28, 3))
    with pytest.raises(NodeError, match="20th layer from the end; this SigLIP has 3 layers"):
        node(None, model=flux, model_patch=patch, clip_vision_output=shallow)
    with pytest.raises(NodeError, match="model_patch: not a model patch"):
        node(None, model=flux, model_patch=None, clip_vision_output=output)
    wide = wv.write_siglip_vision(tmp_path / "wide.safetensors", wv.TinyVision(width=48, layers=20))
    with pytest.raises(NodeError, match="16 image tokens 48 wide, but the projector"):
        node(None, model=flux, model_patch=patch, clip_vision_output=load_clip_vision(wide, CPU).encode(
            torch.rand(1, 28, 28, 3)))


# -- the template ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(home: Path, uso_files: dict[str, Path]) -> Path:  # noqa: F811  (the imported fixture)
    """``home`` of tests/test_templates.py, plus USO's files under the names the template gives: an all-in-one
    Flux dev checkpoint (fp8), USO's DiT LoRA, the projector and a SigLIP of 20 layers (first in the search)."""
    from tui_diffusion.pipeline import checkpoint_writer_lora_dit as wl

    extra = home / "uso"
    w.write_flux_checkpoint(extra / "checkpoints" / "flux1-dev-fp8.safetensors", dtype="fp8_e4m3fn")
    wl.write_dit_lora(extra / "loras" / "uso-flux1-dit-lora-v1.safetensors", w.build_flux_transformer(), "xlabs")
    for kind, path in (("model_patches", uso_files["projector"]), ("clip_vision", uso_files["siglip"])):
        (extra / kind).mkdir(parents=True, exist_ok=True)
        (extra / kind / path.name).symlink_to(path)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
        home / "input" / "flux1_dev_uso_reference_image_gen_input_image.png")
    return home


def _styles_on(data: dict) -> dict:
    """The template with its style references switched on: the Character Reference subgraph's two bypassed
    USOStyleReference instances and their LoadImage nodes (mode 4 -> 0)."""
    data = copy.deepcopy(data)
    sub = next(s for s in data["definitions"]["subgraphs"] if s["name"] == "USO Character Reference")
    for n in sub["nodes"]:
        if n["id"] in (46, 53, 55, 56):
            n["mode"] = 0
    return data


#: case -> (transform of the UI file, what the run must contain)
CASES = {"published": (lambda d: d, {"ImageScaleToMaxDimension", "FluxKontextMultiReferenceLatentMethod"}),
         "style references on": (_styles_on, {"USOStyleReference", "ModelPatchLoader", "CLIPVisionEncode"})}


@pytest.mark.parametrize("case", list(CASES))
def test_uso_template_runs_on_tiny_files(files: Path, tmp_path: Path, case: str) -> None:
    from tui_diffusion.graph.ui_format import ui_to_api
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    transform, wanted = CASES[case]
    api = ui_to_api(transform(json.loads((TEMPLATES / f"{USO}.json").read_text(encoding="utf-8"))), USO)
    assert wanted <= {n["class_type"] for n in api.values()}
    assert api["112:109"]["inputs"]["upscale_method"] == "area" and api["112:109"]["inputs"]["largest_size"] == 512
    assert api["112:57:41"]["inputs"]["reference_latents_method"] == "uxo/uno"
    api["112:109"]["inputs"]["largest_size"] = 32  # as --set would: a small reference
    api["112:110"]["inputs"].update(width=48, height=32)
    api["112:31"]["inputs"]["steps"] = 1
    kinds = ("checkpoints", "loras", "model_patches", "clip_vision")
    extra = tuple((kind, files / "uso" / kind) for kind in kinds) + tuple(
        (kind, files / "extra" / kind) for kind in ("clip_vision",))
    paths = ModelPaths(files / "models", input_dir=files / "input", extra=extra)
    assert not validate_workflow(Workflow.from_data(api), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    (saved,) = sorted((tmp_path / "out").glob("*.png"))
    with Image.open(saved) as image:
        assert image.size == (48, 32)
        assert np.asarray(image.convert("RGB")).std() > 0

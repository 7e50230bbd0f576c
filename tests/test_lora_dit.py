"""LoRAs for the SD3/SD3.5 MMDiT and the Flux.1 transformer, in every layout people have, applied as ComfyUI
applies them: ComfyUI patches the original layout (``W + strength * alpha / rank * up @ down`` on Stability's and
Black Forest Labs' fused layers), so the reference here is exactly that, done on the model's weights in the original
layout and converted back by the project's loader; the patched diffusers model must give the same output. Files in
diffusers' names are also checked against diffusers' own LoRA loading (PEFT), as are XLabs files (diffusers
converts those itself). The cached model is as loaded afterwards; a control LoRA widens the input layer and a
full sampling run reads the conditioning image; a LoRA of the other family is refused naming the file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tui_diffusion.modelfiles import convert_dit
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import checkpoint_writer_lora_dit as lw
from tui_diffusion.pipeline.lora import Patch, load_lora, matched_modules, patched

RANK = 2
STRENGTHS = (1.0, 0.5)


def _model(family: str) -> Any:
    if family == "flux":
        return w.build_flux_transformer(w.TinyFlux(), seed=0)
    return w.build_sd3_transformer(w.TinySD3(), seed=0)


def _inputs(model: Any, in_channels: int | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    c = model.config
    if type(model).__name__ == "FluxTransformer2DModel":
        from tui_diffusion.families.flux import image_ids

        width = in_channels or int(c.in_channels)
        return {"hidden_states": torch.randn(1, 16, width, generator=gen),
                "encoder_hidden_states": torch.randn(1, 6, int(c.joint_attention_dim), generator=gen),
                "pooled_projections": torch.randn(1, int(c.pooled_projection_dim), generator=gen),
                "timestep": torch.tensor([0.7]), "img_ids": image_ids(8, 8, "cpu", torch.float32),
                "txt_ids": torch.zeros(6, 3), "guidance": torch.tensor([3.5])}
    return {"hidden_states": torch.randn(1, int(c.in_channels), 8, 8, generator=gen),
            "encoder_hidden_states": torch.randn(1, 6, int(c.joint_attention_dim), generator=gen),
            "pooled_projections": torch.randn(1, int(c.pooled_projection_dim), generator=gen),
            "timestep": torch.tensor([700.0])}


@torch.no_grad()
def _out(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _from_original(model: Any, original: dict[str, torch.Tensor], in_channels: int | None = None) -> Any:
    """A fresh model holding weights given in the original layout, converted as the loader converts files."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    if in_channels is not None:
        config["in_channels"] = in_channels
    if type(model).__name__ == "FluxTransformer2DModel":
        state = convert_dit.flux_to_diffusers(original, config)
    else:
        state = convert_dit.sd3_to_diffusers(original, config, prefix="")
    ref = type(model)(**config).eval()
    ref.load_state_dict(state, strict=True)
    return ref


def comfyui_reference(model: Any, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], strength: float,
                      scale: float = 1.0, biases: dict[str, torch.Tensor] | None = None,
                      sets: dict[str, torch.Tensor] | None = None, widen: int | None = None) -> Any:
    """ComfyUI's patching of the original layout: pad (reshape_weight), add each pair's delta (``linear1_qkv``:
    the q, k, v rows of ``linear1``), add bias diffs, set norm scales; then converted to diffusers' model."""
    original = lw.original_state(model)
    if widen is not None:
        weight = original["img_in.weight"]
        original["img_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], widen - weight.shape[1])], 1)
    for name, (down, up) in pairs.items():
        key = name.replace("linear1_qkv", "linear1") + ".weight"
        delta = strength * scale * (up.flatten(1) @ down.flatten(1))
        rows = delta.shape[0]
        original[key] = original[key].clone()
        original[key][:rows] += delta.reshape(rows, *original[key].shape[1:])
    for name, delta in (biases or {}).items():  # layer name -> bias delta; or a parameter's name -> its delta
        key = name if name.endswith((".weight", ".bias")) else f"{name}.bias"
        original[key] = original[key] + strength * delta
    for name, value in (sets or {}).items():
        original[name] = value
    return _from_original(model, original, widen)


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_patched(model: Any, lora: Any, strength: float, reference: Any, in_channels: int | None = None) -> None:
    before = _state(model)
    inputs = _inputs(model, in_channels)
    with patched({"unet": model}, [Patch(lora, strength)]):
        got = _out(model, inputs)
    torch.testing.assert_close(got, _out(reference, inputs), rtol=1e-4, atol=1e-5)
    after = _state(model)  # the cached model is as loaded
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- the original layouts (ComfyUI's own, Black Forest Labs', kohya's) --------------------------------------------
ORIGINAL_CASES = [("flux", "comfyui", None), ("flux", "bfl", None), ("flux", "kohya", 4.0),
                  ("sd3", "comfyui", None), ("sd3", "kohya", 1.0)]


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize(("family", "layout", "alpha"), ORIGINAL_CASES)
def test_an_original_layout_lora_patches_as_comfyui_patches_the_original_weights(
        tmp_path: Path, family: str, layout: str, alpha: float | None, strength: float) -> None:
    model = _model(family)
    shapes = lw.original_layers(model)  # every layer: fused qkv, linear1, swapped modulations, embedders
    pairs = lw.random_pairs(shapes, RANK, seed=3)
    path = w.save(lw.lora_state(pairs, layout, alpha), tmp_path / f"{family}_{layout}.safetensors")
    lora = load_lora(path)
    assert matched_modules({"unet": model}, lora) == len(lora.pairs) == len(shapes)
    scale = (alpha / RANK) if alpha is not None else 1.0
    _check_patched(model, lora, strength, comfyui_reference(model, pairs, strength, scale))


# -- diffusers' names (diffusers/PEFT trainers, OneTrainer) ---------------------------------------------------------
def _diffusers_reference(model: Any, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], strength: float,
                         scale: float = 1.0) -> Any:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            weight = ref.get_parameter(f"{name}.weight")
            weight += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return ref


def _peft_loaded(model: Any, path: Path, strength: float) -> Any:
    """diffusers' own loading of a LoRA file onto a copy of the model (its converters, PEFT layers)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    flux = type(model).__name__ == "FluxTransformer2DModel"
    mixin = FluxLoraLoaderMixin if flux else SD3LoraLoaderMixin
    state = mixin.lora_state_dict(str(path))
    ref = copy.deepcopy(model)
    ref.load_lora_adapter(state, adapter_name="test", prefix="transformer")
    ref.set_adapters(["test"], weights=[strength])
    return ref


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_diffusers_peft_lora_equals_diffusers_own_loading(tmp_path: Path, family: str, strength: float) -> None:
    pytest.importorskip("peft")
    model = _model(family)
    pairs = lw.random_pairs(lw.diffusers_layers(model), RANK, seed=4)
    path = w.save(lw.lora_state(pairs, "peft"), tmp_path / "peft.safetensors")
    lora = load_lora(path)
    assert matched_modules({"unet": model}, lora) == len(lora.pairs) == len(pairs)
    _check_patched(model, lora, strength, _peft_loaded(model, path, strength))
    _check_patched(model, lora, strength, _diffusers_reference(model, pairs, strength))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_onetrainer_lora_with_alpha_patches_diffusers_layers(tmp_path: Path, family: str) -> None:
    model = _model(family)
    pairs = lw.random_pairs(lw.diffusers_layers(model), RANK, seed=5)
    lora = load_lora(w.save(lw.lora_state(pairs, "onetrainer", alpha=1.0), tmp_path / "ot.safetensors"))
    assert matched_modules({"unet": model}, lora) == len(pairs)
    _check_patched(model, lora, 0.5, _diffusers_reference(model, pairs, 0.5, scale=1.0 / RANK))


# -- XLabs / USO --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", STRENGTHS)
def test_an_xlabs_lora_patches_as_comfyui_and_as_diffusers(tmp_path: Path, strength: float) -> None:
    """XLabs' processor LoRAs (USO's DiT LoRA is one): a single block's qkv LoRA reaches only linear1's q, k, v."""
    model = _model("flux")
    shapes = lw.xlabs_layers(model)
    pairs = lw.random_pairs(shapes, RANK, seed=6)
    path = w.save(lw.lora_state(pairs, "xlabs"), tmp_path / "uso-flux1-dit-lora-v1.safetensors")
    lora = load_lora(path)
    assert matched_modules({"unet": model}, lora) == len(lora.pairs) == len(shapes)
    _check_patched(model, lora, strength, comfyui_reference(model, pairs, strength))
    pytest.importorskip("peft")
    _check_patched(model, lora, strength, _peft_loaded(model, path, strength))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfyui_full_diffs_of_weights_and_biases_are_added_at_the_strength(tmp_path: Path, family: str) -> None:
    """ComfyUI's ``diff`` (a whole weight's delta) and ``diff_b`` (a bias's), on fused layers too."""
    model = _model(family)
    original = lw.original_state(model)
    layer = "double_blocks.0.img_attn.qkv" if family == "flux" else "joint_blocks.0.x_block.attn.qkv"
    gen = torch.Generator().manual_seed(11)
    diffs = {f"{layer}.weight": torch.randn(original[f"{layer}.weight"].shape, generator=gen) * 0.05,
             f"{layer}.bias": torch.randn(original[f"{layer}.bias"].shape, generator=gen) * 0.05}
    text_in = "txt_in" if family == "flux" else "context_embedder"
    pairs = lw.random_pairs({text_in: lw.original_layers(model)[text_in]}, RANK, seed=12)
    sd = lw.lora_state(pairs, "comfyui")
    sd[f"diffusion_model.{layer}.diff"], sd[f"diffusion_model.{layer}.diff_b"] = diffs.values()
    lora = load_lora(w.save(sd, tmp_path / "diff.safetensors"))
    _check_patched(model, lora, 0.5, comfyui_reference(model, pairs, 0.5, biases=diffs))


# -- control LoRAs ------------------------------------------------------------------------------------------------
def _control_reference(model: Any, path: Path, strength: float) -> Any:
    """The reference from the file's own tensors in Black Forest Labs' names."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    pairs = {k.removesuffix(".lora_A.weight"): (v, sd[k.replace("lora_A", "lora_B")])
             for k, v in sd.items() if k.endswith(".lora_A.weight")}
    biases = {k.removesuffix(".lora_B.bias"): v for k, v in sd.items() if k.endswith(".lora_B.bias")}
    sets = {k: v for k, v in sd.items() if k.endswith("_norm.scale")}
    return comfyui_reference(model, pairs, strength, biases=biases, sets=sets, widen=pairs["img_in"][0].shape[1])


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("layout", ["bfl", "comfyui", "comfyui_older"])
def test_a_flux_control_lora_widens_the_input_and_patches_as_comfyui(tmp_path: Path, layout: str,
                                                                     strength: float) -> None:
    """As published by Black Forest Labs, as ComfyUI's converter writes it, and as its first version wrote the
    norm scales (``key_norm.set_weight``, no ``.scale``)."""
    from safetensors.torch import load_file

    model = _model("flux")
    bfl = lw.write_flux_control_lora(tmp_path / "bfl.safetensors", model, RANK, seed=7)
    path = bfl if layout == "bfl" else lw.write_flux_control_lora(tmp_path / "flux1-depth-dev-lora.safetensors",
                                                                  model, RANK, seed=7, layout="comfyui")
    if layout == "comfyui_older":
        path = w.save({k.replace("_norm.scale.set_weight", "_norm.set_weight"): v
                       for k, v in load_file(str(path)).items()}, tmp_path / "older.safetensors")
    lora = load_lora(path)
    assert lora.reshapes == {"unet:img_in": (128, 128)} and lora.sets and lora.diffs
    assert matched_modules({"unet": model}, lora) == len(lora.pairs)
    _check_patched(model, lora, strength, _control_reference(model, bfl, strength), in_channels=128)
    with patched({"unet": model}, [Patch(lora, strength)]):
        assert model.x_embedder.weight.shape == (128, 128) and model.config.in_channels == 128
    assert model.x_embedder.weight.shape == (128, 64) and model.x_embedder.in_features == 64
    assert model.config.in_channels == 64


# -- through the nodes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(tmp_path_factory.mktemp("dit-lora-models"))
    w.write_flux_transformer(root / "diffusion_models" / "flux1-dev.safetensors")
    w.write_flux_transformer(root / "diffusion_models" / "flux1-dev-fp8.safetensors", dtype="fp8_e4m3fn")
    w.write_sd3_transformer(root / "diffusion_models" / "sd3.5_medium.safetensors")
    w.write_vae16(root / "vae" / "ae.safetensors", flux=True)
    w.write_text_encoders(root / "text_encoders")
    flux, sd3 = _model("flux"), _model("sd3")
    lw.write_flux_control_lora(root / "loras" / "flux1-depth-dev-lora.safetensors", flux, RANK, seed=8)
    lw.write_dit_lora(root / "loras" / "flux_style.safetensors", flux, "kohya", RANK, seed=9, alpha=2.0)
    lw.write_dit_lora(root / "loras" / "sd35_style.safetensors", sd3, "comfyui", RANK, seed=10)
    return root


def _ctx(root: Path, tmp_path: Path) -> Any:
    from tests.dit_helpers import CPU
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.models import ModelCache

    engine = EngineState(CPU, ModelCache(4), ModelPaths(root), tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    return NodeContext(engine, "1", {}, lambda *a: None, lambda: False)


@pytest.mark.parametrize("unet_name", ["flux1-dev.safetensors", "flux1-dev-fp8.safetensors"])
def test_a_control_lora_through_the_nodes_reads_the_conditioning_image(models_root: Path, tmp_path: Path,
                                                                       unet_name: str) -> None:
    """LoraLoaderModelOnly + InstructPixToPixConditioning + KSampler, as ComfyUI's Flux Depth LoRA template wires
    them (on its fp8 file too, kept in fp8 between layer calls): the sampled latent depends on the conditioning
    image, a second run gives the same, and the cached transformer keeps its 64 inputs and its weights."""
    from tui_diffusion.pipeline.registry import implementations

    nodes, ctx = implementations(), _ctx(models_root, tmp_path)
    (model,) = nodes["UNETLoader"](ctx, unet_name=unet_name, weight_dtype="default").outputs
    loaded = {k: v.float().clone() for k, v in model.unet.state_dict().items()}
    (patched_model,) = nodes["LoraLoaderModelOnly"](ctx, model=model, lora_name="flux1-depth-dev-lora.safetensors",
                                                    strength_model=1.0).outputs
    (clip,) = nodes["DualCLIPLoader"](ctx, clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                                      type="flux").outputs
    (vae,) = nodes["VAELoader"](ctx, vae_name="ae.safetensors").outputs
    (cond,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="a ghost").outputs

    def sample(image: torch.Tensor) -> torch.Tensor:
        pos, neg, latent = nodes["InstructPixToPixConditioning"](ctx, positive=cond, negative=cond, vae=vae,
                                                                 pixels=image).outputs
        (out,) = nodes["KSampler"](ctx, model=patched_model, seed=1, steps=1, cfg=1.0, sampler_name="euler",
                                   scheduler="simple", positive=pos, negative=neg, latent_image=latent,
                                   denoise=1.0).outputs
        return out["samples"]

    dark, light = torch.zeros(1, 64, 64, 3), torch.ones(1, 64, 64, 3)
    a, b = sample(dark), sample(light)
    assert a.shape == (1, 16, 8, 8) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # the widened input reads the image's latent
    # again: fp8 weights come back from a run as inference tensors, which the patch must still change and restore
    assert torch.equal(sample(dark), a)
    assert model.unet.x_embedder.in_features == 64 and model.unet.config.in_channels == 64
    state = model.unet.state_dict()
    assert all(torch.equal(state[k].float(), v) for k, v in loaded.items())


def test_a_lora_of_the_other_family_is_refused_naming_the_file(models_root: Path, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.registry import implementations

    nodes, ctx = implementations(), _ctx(models_root, tmp_path)
    (flux,) = nodes["UNETLoader"](ctx, unet_name="flux1-dev.safetensors", weight_dtype="default").outputs
    (sd3,) = nodes["UNETLoader"](ctx, unet_name="sd3.5_medium.safetensors", weight_dtype="default").outputs
    with pytest.raises(NodeError, match=r"flux_style\.safetensors: .*another model family"):
        nodes["LoraLoaderModelOnly"](ctx, model=sd3, lora_name="flux_style.safetensors", strength_model=1.0)
    with pytest.raises(NodeError, match=r"sd35_style\.safetensors: .*another model family"):
        nodes["LoraLoaderModelOnly"](ctx, model=flux, lora_name="sd35_style.safetensors", strength_model=1.0)
    (ok,) = nodes["LoraLoaderModelOnly"](ctx, model=flux, lora_name="flux_style.safetensors",
                                         strength_model=0.5).outputs
    assert len(ok.patches) == 1 and ok.patches[0].strength == 0.5


@pytest.mark.parametrize("key", ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                 "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"])
def test_a_flux_lora_with_text_encoder_layers_patches_clip_l_through_lora_loader(models_root: Path, tmp_path: Path,
                                                                              key: str) -> None:
    """kohya's Flux LoRAs may train CLIP-L too (``lora_te1_*``; ComfyUI's own files name it
    ``text_encoders.clip_l.*``): LoraLoader patches the DualCLIPLoader's CLIP-L, as ComfyUI maps them to it;
    strength_clip 0 leaves the encoding alone."""
    from tui_diffusion.pipeline.registry import implementations

    nodes, ctx = implementations(), _ctx(models_root, tmp_path)
    (model,) = nodes["UNETLoader"](ctx, unet_name="flux1-dev.safetensors", weight_dtype="default").outputs
    (clip,) = nodes["DualCLIPLoader"](ctx, clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                                      type="flux").outputs
    clip_l = clip.parts()["clip_l"]
    q_proj = getattr(clip_l, "text_model", clip_l).encoder.layers[0].self_attn.q_proj  # transformers 4 / 5
    layer = "double_blocks.0.img_attn.proj"
    pairs = lw.random_pairs({layer: lw.original_layers(model.unet)[layer]})
    sd = lw.lora_state(pairs, "kohya", alpha=2.0)
    gen = torch.Generator().manual_seed(2)
    sd[f"{key}.lora_down.weight"] = torch.randn(RANK, q_proj.in_features, generator=gen)
    sd[f"{key}.lora_up.weight"] = torch.randn(q_proj.out_features, RANK, generator=gen)
    w.save(sd, models_root / "loras" / "flux_with_te.safetensors")

    def pooled(strength_clip: float) -> torch.Tensor:
        _, new_clip = nodes["LoraLoader"](ctx, model=model, clip=clip, lora_name="flux_with_te.safetensors",
                                          strength_model=1.0, strength_clip=strength_clip).outputs
        (cond,) = nodes["CLIPTextEncode"](ctx, clip=new_clip, text="a ghost").outputs
        return cond[0][1]["pooled_output"]

    (plain,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="a ghost").outputs
    assert torch.equal(pooled(0.0), plain[0][1]["pooled_output"])
    assert not torch.allclose(pooled(1.0), plain[0][1]["pooled_output"])
    (again,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="a ghost").outputs
    assert torch.equal(again[0][1]["pooled_output"], plain[0][1]["pooled_output"])  # the cached CLIP is clean

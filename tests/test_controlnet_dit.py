"""SD3/SD3.5 and Flux.1 ControlNets (issue 16 item 1): Stability's SD3.5 Large ControlNet files and ControlNets in
diffusers' SD3 and Flux (InstantX/Shakker) layouts load offline from their tensor shapes, and while sampling their
residuals are those of diffusers' ``SD3ControlNetModel``/``FluxControlNetModel`` on the same weights, added to
the transformer's blocks as ComfyUI adds them, with the hint encoded by the VAE as ComfyUI encodes it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.dit_helpers import CPU
from tui_diffusion.pipeline import checkpoint_writer_controlnet as cw
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import models_dit as md
from tui_diffusion.pipeline.controlnet import Control, control_inputs, load_control, sd35_position_embedding
from tui_diffusion.pipeline.errors import NodeError

G = torch.Generator


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("controlnet_dit"))


@pytest.fixture(scope="module")
def vae(root: Path) -> object:
    from tui_diffusion.pipeline.models import load_vae

    return load_vae(w.write_vae16(root / "vae.safetensors", flux=False), CPU, root / "cfg")


@pytest.fixture(scope="module")
def sd3(root: Path) -> object:
    """A two-block SD3 model (qk norm, dual attention in block 0)."""
    return md.model_handle("sd3", w.build_sd3_transformer(w.TinySD3(depth=2)), CPU, "sd3")


@pytest.fixture(scope="module")
def flux() -> object:
    """A Flux dev model with two double and two single blocks (ControlNets of one each are repeated)."""
    return md.model_handle("flux", w.build_flux_transformer(w.TinyFlux(layers=2, single_layers=2)), CPU, "flux")


def _entries(model: object, seed: int = 1) -> tuple[list, torch.Tensor, torch.Tensor]:
    cfg = model.unet.config
    g = G().manual_seed(seed)
    context = torch.randn(1, 12, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    extras = {"pooled_output": pooled}
    if model.family.id == "flux":
        extras["guidance"] = 3.5
    return [(context, extras)], context, pooled


def _hint_image(seed: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=G().manual_seed(seed))


def _call(model: object, entry: tuple, control: Control, x: torch.Tensor, sigma: float) -> tuple[dict, torch.Tensor]:
    """The Denoiser's path for one row: the family's kwargs, the control hook, the model call."""
    entries = [(entry[0], {**entry[1], "control": control})]
    kwargs = model.family.model_kwargs(model, entries, batch=1, latent_shape=tuple(x.shape), negative=[False],
                                       device=x.device, dtype=torch.float32)
    ms = model.model_sampling
    s = torch.tensor([sigma])
    t = ms.timestep(s).float()
    extra = control_inputs(model, entries, x, t, sigma, kwargs, 1)
    kwargs.update(extra)
    with torch.no_grad():
        out = model.family.apply_model(model, x, t, kwargs)
    return extra, out


# -- loading ----------------------------------------------------------------------------------------------------
def test_sd35_file_in_stabilitys_layout_loads_weight_for_weight(root: Path, sd3: object) -> None:
    net = cw.build_sd35_controlnet(sd3.unet, num_layers=1)
    path = cw.write_dit_controlnet(root / "sd3.5_large_controlnet_canny.safetensors", net, "sd35", control_type=1)
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert "transformer_blocks.0.attn.qkv.weight" in keys and "transformer_blocks.0.adaLN_modulation.1.bias" in keys
    assert "control_type" in keys and not any(k.startswith(("pos_embed.", "x_embedder.")) for k in keys)
    loaded = load_control(path, CPU)
    assert (loaded.kind, loaded.label, loaded.preprocess) == ("sd35", "SD3/SD3.5", "canny")
    assert loaded.latent_hint == (1.5305, 0.0609)
    ours = loaded.net.state_dict()
    assert set(ours) == set(net.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in net.state_dict().items())
    depth = cw.write_dit_controlnet(root / "depth.safetensors", net, "sd35", control_type=2)
    assert load_control(depth, CPU).preprocess == "depth"


def test_diffusers_layout_sd3_and_flux_load_with_configs_from_shapes(root: Path, sd3: object, flux: object) -> None:
    for net, kind in ((cw.build_sd3_controlnet(sd3.unet, num_layers=2), "sd3"),
                      (cw.build_flux_controlnet(flux.unet, num_mode=10), "flux")):
        loaded = load_control(cw.write_dit_controlnet(root / f"{kind}.safetensors", net), CPU)
        assert loaded.kind == kind and loaded.needs_vae
        for key in ("num_layers", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                    "in_channels"):
            assert loaded.net.config[key] == net.config[key], key
        assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    assert load_control(root / "flux.safetensors", CPU).net.config.num_mode == 10
    assert load_control(root / "sd3.safetensors", CPU).latent_hint == (1.5305, 0.0)


def test_position_embedding_is_comfyuis_grid() -> None:
    """A 2x4 grid: rows at 7.5 -/+ 7.5, columns spanning twice that; column waves first, then row waves."""
    emb = sd35_position_embedding(8, 2, 4)
    assert emb.shape == (8, 8)
    cols = torch.linspace(-7.5, 22.5, 4).repeat(2)
    rows = torch.tensor([0.0, 15.0]).repeat_interleave(4)
    omega = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(emb[:, 0:2], torch.sin(cols[:, None] * omega))
    torch.testing.assert_close(emb[:, 2:4], torch.cos(cols[:, None] * omega))
    torch.testing.assert_close(emb[:, 4:6], torch.sin(rows[:, None] * omega))
    torch.testing.assert_close(emb[:, 6:8], torch.cos(rows[:, None] * omega))


# -- residuals against diffusers ----------------------------------------------------------------------------------
def _encoded(vae: object, image: torch.Tensor, size: tuple[int, int], scale: float, shift: float) -> torch.Tensor:
    """ComfyUI's hint: nearest-exact resize to the latent's pixels, VAE mean, (latent - shift) * scale."""
    from tui_diffusion.pipeline.nodes_latent import common_upscale

    pixels = common_upscale(image, size[1] * 8, size[0] * 8, "nearest-exact", "center")
    return (vae.encode(pixels.movedim(1, -1)) - shift) * scale


@pytest.mark.parametrize("mask_channels", [0, 1])
def test_sd3_diffusers_layout_residuals_equal_diffusers(root: Path, sd3: object, vae: object,
                                                        mask_channels: int) -> None:
    """InstantX-style SD3 ControlNet: diffusers' controlnet (zero pooled vector, as its pipeline does for these)
    and its transformer called with ``block_controlnet_hidden_states`` give our output exactly. An inpainting one
    (17 hint channels) gets a mask channel of ones, as ComfyUI gives it without a mask."""
    net = cw.build_sd3_controlnet(sd3.unet, num_layers=1, extra_conditioning_channels=mask_channels)
    cm = load_control(cw.write_dit_controlnet(root / f"sd3_one_{mask_channels}.safetensors", net), CPU)
    entries, context, pooled = _entries(sd3)
    image = _hint_image()
    control = Control(cm, image, 0.7, vae=vae)
    x = torch.randn(1, 16, 8, 8, generator=G().manual_seed(3))
    extra, ours = _call(sd3, entries[0], control, x, 0.6)
    hint = _encoded(vae, image, (8, 8), 1.5305, 0.0)
    hint = torch.cat([hint, torch.ones(1, mask_channels, 8, 8)], dim=1)
    t = torch.tensor([600.0])
    with torch.no_grad():
        blocks = net(hidden_states=x, controlnet_cond=hint, conditioning_scale=0.7, encoder_hidden_states=context,
                     pooled_projections=torch.zeros_like(pooled), timestep=t, return_dict=False)[0]
        ref = sd3.unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                       block_controlnet_hidden_states=blocks, return_dict=False)[0]
        plain = sd3.unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                         return_dict=False)[0]
    torch.testing.assert_close(extra["block_controlnet_hidden_states"][0], blocks[0], rtol=0, atol=0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3


def test_sd35_residuals_equal_diffusers_with_comfyuis_positions(root: Path, sd3: object, vae: object) -> None:
    """Stability's layout: the model's patch embedding plus ComfyUI's positions go into diffusers' controlnet (the
    canny file's hint scaled as ComfyUI scales it); its one block's output serves both blocks of the model, the
    last one included (ComfyUI adds it there; diffusers' transformer would leave that block out)."""
    net = cw.build_sd35_controlnet(sd3.unet, num_layers=1, seed=4)
    cm = load_control(cw.write_dit_controlnet(root / "sd35_canny.safetensors", net, "sd35", control_type=1), CPU)
    entries, context, pooled = _entries(sd3)
    image = _hint_image(h=48, w=80)  # another aspect: centre-cropped to the latent's
    control = Control(cm, image, 1.0, vae=vae)
    x = torch.randn(1, 16, 6, 10, generator=G().manual_seed(5))
    extra, ours = _call(sd3, entries[0], control, x, 0.3)
    hint = _encoded(vae, image * 255 * 0.5 + 0.5, (6, 10), 1.5305, 0.0609)
    t = torch.tensor([300.0])
    with torch.no_grad():
        tokens = sd3.unet.pos_embed.proj(x).flatten(2).transpose(1, 2) + sd35_position_embedding(128, 3, 5)
        (block,) = net(hidden_states=tokens, controlnet_cond=hint, pooled_projections=pooled, timestep=t,
                       return_dict=False)[0]
        last = sd3.unet.transformer_blocks[-1]
        handle = last.register_forward_hook(lambda m, a, out: (out[0], out[1] + block))
        try:
            ref = sd3.unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                           block_controlnet_hidden_states=[block, block], return_dict=False)[0]
        finally:
            handle.remove()
    assert [r.shape for r in extra["block_controlnet_hidden_states"]] == [block.shape] * 2
    torch.testing.assert_close(extra["block_controlnet_hidden_states"][1], block, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the last block's residual was used once: a call without control gives the plain output again
    with torch.no_grad():
        kwargs = sd3.family.model_kwargs(sd3, entries, batch=1, latent_shape=tuple(x.shape), negative=[False],
                                         device=x.device, dtype=torch.float32)
        plain = sd3.family.apply_model(sd3, x, t, kwargs)
        direct = sd3.unet(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                          return_dict=False)[0]
    torch.testing.assert_close(plain, direct, rtol=0, atol=0)


@pytest.mark.parametrize("union_type", [None, 3])
def test_flux_residuals_equal_diffusers(root: Path, flux: object, vae: object, union_type: int | None) -> None:
    """InstantX/Shakker layout (a union one): the packed hint latent in Flux's latent space, the model's
    guidance, the task token SetUnionControlNetType picks (none for "auto"); one double and one single block
    repeated over the model's two of each, as diffusers' transformer repeats them."""
    from tui_diffusion.families.flux import image_ids, pack

    net = cw.build_flux_controlnet(flux.unet, num_mode=10, seed=6)
    cm = load_control(cw.write_dit_controlnet(root / "flux_union.safetensors", net), CPU)
    cm = replace(cm, union_type=union_type)
    entries, context, pooled = _entries(flux)
    image = _hint_image(seed=7)
    control = Control(cm, image, 0.8, vae=vae)
    x = torch.randn(1, 16, 8, 8, generator=G().manual_seed(8))
    extra, ours = _call(flux, entries[0], control, x, 0.5)
    hint = pack(_encoded(vae, image, (8, 8), 0.3611, 0.1159))
    t, guidance = torch.tensor([0.5]), torch.tensor([3.5])
    txt_ids, img_ids = torch.zeros(12, 3), image_ids(8, 8, "cpu", torch.float32)
    mode = None if union_type is None else torch.tensor([[union_type]])
    with torch.no_grad():
        net.union = mode is not None
        double, single = net(hidden_states=pack(x), controlnet_cond=hint, controlnet_mode=mode, conditioning_scale=0.8,
                             encoder_hidden_states=context, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                             txt_ids=txt_ids, guidance=guidance, return_dict=False)
        net.union = True
        ref = flux.unet(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, controlnet_block_samples=double,
                        controlnet_single_block_samples=single, return_dict=False)[0]
    torch.testing.assert_close(extra["controlnet_block_samples"][1], double[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(extra["controlnet_single_block_samples"][0], single[0], rtol=1e-6, atol=1e-6)
    from tui_diffusion.families.flux import unpack

    torch.testing.assert_close(ours, unpack(ref, 8, 8), rtol=1e-5, atol=1e-5)


def test_chained_and_windowed_dit_controlnets(root: Path, sd3: object, vae: object) -> None:
    """Two chained ControlNets add their strength-scaled residuals; outside its window one adds nothing."""
    net = cw.build_sd3_controlnet(sd3.unet, num_layers=1)
    cm = load_control(cw.write_dit_controlnet(root / "sd3_chain.safetensors", net), CPU)
    entries, _, _ = _entries(sd3)
    x = torch.randn(1, 16, 8, 8, generator=G().manual_seed(9))
    first = Control(cm, _hint_image(10), 0.5, vae=vae)
    second = Control(cm, _hint_image(11), 1.5, vae=vae, previous=first)
    both, _ = _call(sd3, entries[0], second, x, 0.6)
    a, _ = _call(sd3, entries[0], Control(cm, _hint_image(10), 0.5, vae=vae), x, 0.6)
    b, _ = _call(sd3, entries[0], Control(cm, _hint_image(11), 1.5, vae=vae), x, 0.6)
    torch.testing.assert_close(both["block_controlnet_hidden_states"][0],
                               a["block_controlnet_hidden_states"][0] + b["block_controlnet_hidden_states"][0])
    late = Control(cm, _hint_image(10), 1.0, 0.5, 1.0, vae=vae)  # only from half the schedule on
    assert _call(sd3, entries[0], late, x, 0.99)[0] == {}
    assert _call(sd3, entries[0], late, x, 0.2)[0]


def test_wrong_family_and_missing_vae_are_clear_errors(root: Path, sd3: object, flux: object) -> None:
    from tui_diffusion.pipeline.nodes_controlnet import apply_advanced

    net = cw.build_sd3_controlnet(sd3.unet, num_layers=1)
    cm = load_control(cw.write_dit_controlnet(root / "sd3_err.safetensors", net), CPU)
    entries, _, _ = _entries(flux)
    with pytest.raises(NodeError, match="SD3/SD3.5 ControlNet cannot control a Flux.1 model"):
        _call(flux, entries[0], Control(cm, _hint_image(), 1.0), torch.randn(1, 16, 8, 8), 0.5)
    cond = [[torch.zeros(1, 4, 8), {}]]
    with pytest.raises(NodeError, match="vae: .*connect the model's VAE"):
        apply_advanced(cond, cond, cm, torch.rand(1, 8, 8, 3), 1.0, 0.0, 1.0, None)


def test_set_union_controlnet_type_picks_the_task_token(root: Path, flux: object) -> None:
    from tui_diffusion.pipeline.nodes_controlnet import set_union_controlnet_type

    net = cw.build_flux_controlnet(flux.unet, num_mode=2)
    cm = load_control(cw.write_dit_controlnet(root / "flux_union2.safetensors", net), CPU)
    depth = set_union_controlnet_type(None, cm, "depth").outputs[0]
    assert depth.union_type == 1 and depth.net is cm.net and cm.union_type is None
    assert set_union_controlnet_type(None, depth, "auto").outputs[0].union_type is None
    with pytest.raises(NodeError, match="knows 2 tasks, 'normal' is number 4"):
        set_union_controlnet_type(None, cm, "normal")


def test_xlabs_flux_controlnet_equals_diffusers_with_repeated_blocks(root: Path) -> None:
    """XLabs' layout: Black Forest Labs' keys, loaded weight for weight; the image itself (no VAE) in -1..1 through
    the hint convolutions; its two blocks' outputs cycle over the model's four (diffusers'
    ``controlnet_blocks_repeat``, ComfyUI's tiling), not each repeated in turn as a latent-hint ControlNet's."""
    from tui_diffusion.families.flux import image_ids, pack, unpack
    from tui_diffusion.pipeline.nodes_latent import common_upscale

    model = md.model_handle("flux", w.build_flux_transformer(w.TinyFlux(layers=4)), CPU, "flux4")
    net = cw.build_xlabs_controlnet(model.unet, num_layers=2, seed=12)
    path = cw.write_dit_controlnet(root / "flux-canny-controlnet-v3.safetensors", net, "xlabs")
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert {"double_blocks.1.img_attn.qkv.weight", "controlnet_blocks.1.weight", "pos_embed_input.weight",
            "input_hint_block.14.weight", "img_in.weight"} <= keys
    cm = load_control(path, CPU)
    assert cm.kind == "flux" and not cm.needs_vae
    assert all(torch.equal(cm.net.state_dict()[k], v) for k, v in net.state_dict().items())
    entries, context, pooled = _entries(model)
    image = _hint_image(seed=13, h=40, w=72)
    x = torch.randn(1, 16, 8, 8, generator=G().manual_seed(14))
    extra, ours = _call(model, entries[0], Control(cm, image, 0.9), x, 0.4)
    hint = common_upscale(image, 64, 64, "nearest-exact", "center") * 2 - 1
    t, guidance = torch.tensor([0.4]), torch.tensor([3.5])
    txt_ids, img_ids = torch.zeros(12, 3), image_ids(8, 8, "cpu", torch.float32)
    with torch.no_grad():
        double, single = net(hidden_states=pack(x), controlnet_cond=hint, conditioning_scale=0.9,
                             encoder_hidden_states=context, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                             txt_ids=txt_ids, guidance=guidance, return_dict=False)
        ref = model.unet(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, controlnet_block_samples=double,
                         controlnet_blocks_repeat=True, return_dict=False)[0]
    assert single is None and "controlnet_single_block_samples" not in extra
    got = extra["controlnet_block_samples"]
    torch.testing.assert_close(torch.stack(got), torch.stack([double[0], double[1], double[0], double[1]]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, unpack(ref, 8, 8), rtol=1e-5, atol=1e-5)


def test_flux_union_controlnet_workflow_runs_and_changes_the_image(tmp_path_factory: pytest.TempPathFactory,
                                                                   tmp_path: Path) -> None:
    """The shipped flux-dev workflow with ControlNetLoader -> SetUnionControlNetType -> ControlNetApplyAdvanced
    (the VAELoader's VAE connected) runs through the executor; at strength 0 it is the plain image, otherwise not."""
    import json

    import numpy as np
    from PIL import Image

    from tests.dit_helpers import shared_models
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    models = shared_models(tmp_path_factory)
    extra = tmp_path / "controlnet"
    cw.write_dit_controlnet(extra / "flux-union-pro.safetensors",
                            cw.build_flux_controlnet(w.build_flux_transformer(), num_mode=10, seed=15))
    (tmp_path / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "input" / "hint.png")
    data = json.loads((Path(__file__).parents[1] / "workflows" / "flux-dev.json").read_text())
    data = data.get("prompt", data)
    data["48"]["inputs"].update(width=64, height=48)
    data["50"]["inputs"].update(steps=2, positive=["63", 0], negative=["63", 1])
    data.update({
        "60": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "flux-union-pro.safetensors"}},
        "61": {"class_type": "SetUnionControlNetType",
               "inputs": {"control_net": ["60", 0], "type": "canny/lineart/anime_lineart/mlsd"}},
        "62": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "63": {"class_type": "ControlNetApplyAdvanced",
               "inputs": {"positive": ["49", 0], "negative": ["52", 0], "control_net": ["61", 0],
                          "image": ["62", 0], "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0,
                          "vae": ["45", 0]}},
    })
    paths = ModelPaths(models, input_dir=tmp_path / "input", extra=(("controlnet", extra),))
    images = []
    for strength in (0.8, 0.0):
        data["63"]["inputs"]["strength"] = strength
        out = tmp_path / f"out{strength}"
        engine = EngineState(CPU, ModelCache(4), paths, out, tmp_path / "tmp", tmp_path / "cfg")
        Executor(engine).run(data, Hooks(), lambda: False)
        (saved,) = sorted(out.glob("*.png"))
        images.append(np.asarray(Image.open(saved)).astype(int))
    assert np.abs(images[0] - images[1]).max() > 0


def test_apply_sd3_node_shares_one_control_with_its_vae(root: Path, sd3: object, vae: object) -> None:
    """ControlNetApplySD3 (VAE required) is ControlNetApplyAdvanced with the VAE: one control for both sides,
    chained to what the conditioning had, holding the VAE that will encode its hint."""
    from tui_diffusion.pipeline.nodes_controlnet import controlnet_apply_sd3

    net = cw.build_sd3_controlnet(sd3.unet, num_layers=1)
    cm = load_control(cw.write_dit_controlnet(root / "sd3_node.safetensors", net), CPU)
    earlier = Control(cm, _hint_image(), 1.0, vae=vae)
    positive = [[torch.zeros(1, 4, 128), {"control": earlier}]]
    negative = [[torch.zeros(1, 4, 128), {"control": earlier}]]
    pos, neg = controlnet_apply_sd3(None, positive, negative, cm, vae, torch.rand(1, 16, 16, 3), 0.5, 0.1, 0.9).outputs
    control = pos[0][1]["control"]
    assert control is neg[0][1]["control"] and control.previous is earlier and control.vae is vae
    assert (control.strength, control.start_percent, control.end_percent) == (0.5, 0.1, 0.9)

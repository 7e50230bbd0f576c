"""A VAE loaded alone (VAELoader) decodes exactly as the checkpoint's own: LATENT is unscaled, so a VAE needs
no knowledge of the model family, only its latent width (4 or 16 channels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY, TINY_XL
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint, load_vae
from tui_diffusion.pipeline.nodes import vae_decode
from tui_diffusion.pipeline.nodes_latent import vae_encode
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


def _ctx(models_dir: Path, tmp_path: Path) -> NodeContext:
    engine = EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp_path / "out", tmp_path / "tmp",
                         tmp_path / "cfg")
    return NodeContext(engine, "1", {}, lambda *_: None, lambda: False)


def _vae_file(checkpoint: Path, target: Path) -> Path:
    """The checkpoint's VAE tensors alone, in the original layout without the checkpoint's prefix."""
    with safe_open(str(checkpoint), framework="pt") as f:
        state = {k.removeprefix("first_stage_model."): f.get_tensor(k) for k in f.keys()
                 if k.startswith("first_stage_model.")}
    save_file(state, str(target))
    return target


@pytest.mark.parametrize("name", [TINY_XL, TINY])
def test_a_vae_loaded_alone_decodes_as_the_checkpoints_own(name: str, models_dir: Path, tmp_path: Path) -> None:
    ctx = _ctx(models_dir, tmp_path)
    loaded = load_checkpoint(models_dir / "checkpoints" / name, CPU, tmp_path / "cfg")
    alone = load_vae(_vae_file(models_dir / "checkpoints" / name, tmp_path / "vae.safetensors"), CPU, tmp_path / "cfg")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    latent = vae_encode(ctx, image, loaded.vae).outputs[0]  # what this family's checkpoint VAE encodes
    own = vae_decode(ctx, latent, loaded.vae).outputs[0]
    other = vae_decode(ctx, latent, alone).outputs[0]
    assert (own * 255 - other * 255).abs().max() <= 1.0
    assert vae_encode(ctx, image, alone).outputs[0]["samples"].equal(latent["samples"])


def test_a_16_channel_vae_loads_alone(tmp_path: Path, models_dir: Path) -> None:
    from tui_diffusion.pipeline.checkpoint_writer_dit import FLUX_VAE_FACTORS, build_vae16, write_vae16

    path = write_vae16(tmp_path / "ae.safetensors", flux=True, seed=3)
    alone = load_vae(path, CPU, tmp_path / "cfg")
    built = build_vae16(FLUX_VAE_FACTORS, seed=3)
    assert alone.latent_channels == 16
    ours, theirs = alone.vae.state_dict(), built.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ctx = _ctx(models_dir, tmp_path)
    with pytest.raises(NodeError, match="4 channels but this VAE takes 16"):
        vae_decode(ctx, {"samples": torch.zeros(1, 4, 8, 8)}, alone)


@pytest.fixture(scope="module")
def dit_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.dit_helpers import shared_models

    return shared_models(tmp_path_factory)


def _published_vae16(family: str, target: Path) -> Path:
    """The all-in-one checkpoint's VAE (same seed, same fp8 storage) as its own file, in the layout published
    for the family: Black Forest Labs' ``ae.safetensors`` (LDM keys, no prefix) for Flux, the diffusers layout
    of Stability's ``vae/`` folder for SD3."""
    from tui_diffusion.pipeline import checkpoint_writer_dit as w

    if family == "flux":
        return w.write_vae16(target, flux=True, dtype="fp8_e4m3fn")
    return w.save(w.build_vae16(w.SD3_VAE_FACTORS).state_dict(), target, "fp8_e4m3fn")


@pytest.mark.parametrize(("family", "name", "prefix"), [
    ("sd3", "sd3.5_large_fp8_scaled.safetensors", "first_stage_model."),
    ("flux", "flux1-schnell-fp8.safetensors", "vae."),
])
def test_a_16_channel_vae_loaded_alone_decodes_as_the_checkpoints_own(family: str, name: str, prefix: str,
                                                                      dit_models: Path, tmp_path: Path) -> None:
    checkpoint = dit_models / "checkpoints" / name
    alone_path = _published_vae16(family, tmp_path / "vae.safetensors")
    if family == "flux":  # the separate file holds the very tensors the checkpoint stores under its prefix
        with safe_open(str(checkpoint), framework="pt") as a, safe_open(str(alone_path), framework="pt") as b:
            assert {k.removeprefix(prefix) for k in a.keys() if k.startswith(prefix)} == set(b.keys())
            assert all(torch.equal(a.get_tensor(prefix + k).float(), b.get_tensor(k).float()) for k in b.keys())
    ctx = _ctx(dit_models, tmp_path)
    loaded = load_checkpoint(checkpoint, CPU, tmp_path / "cfg")
    alone = load_vae(alone_path, CPU, tmp_path / "cfg")
    assert loaded.vae.latent_channels == alone.latent_channels == 16
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))}
    own = vae_decode(ctx, latent, loaded.vae).outputs[0]
    other = vae_decode(ctx, latent, alone).outputs[0]
    assert float(own.std()) > 0.02  # not a flat image, where any two VAEs would agree
    assert (own * 255 - other * 255).abs().max() <= 1.0

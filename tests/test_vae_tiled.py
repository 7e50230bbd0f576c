"""VAEDecodeTiled and VAEEncodeTiled: ComfyUI's three tilings (square, tall, wide) blended over the overlap and
averaged. A VAE that acts on each latent cell alone gives the untiled result exactly, whatever the tiling; a real
tiny VAE on an image that fits one tile gives VAEDecode's and VAEEncode's results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
CTX = NodeContext(None, "1", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]
NODES = implementations()


class CellwiseVae:
    """A VAE whose decode upsamples each latent cell to an 8x8 block and whose encode averages 8x8 blocks: no
    cell sees its neighbours, so tiles cannot show."""

    latent_channels = 4
    downscale = 8
    vae = torch.nn.Identity()  # what the placement policy moves (nothing, here)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.tanh(z[:, :3] + z[:, 3:]), scale_factor=8, mode="nearest")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1)


def test_specs_are_comfyuis() -> None:
    for name, step in (("VAEDecodeTiled", 32), ("VAEEncodeTiled", 64)):
        spec = NODE_SPECS[name]
        tile = spec.input("tile_size")
        assert (tile.default, tile.min, tile.max, tile.step) == (512, 64, 4096, step)
        assert spec.input("overlap").default == 64 and spec.input("temporal_size").default == 64
        assert spec.input("temporal_overlap").default == 8 and spec.category == "_for_testing"


@pytest.mark.parametrize("tile,overlap", [(64, 16), (96, 32), (64, 64)])
def test_a_cellwise_vae_decodes_tiled_exactly_as_whole(tile: int, overlap: int) -> None:
    vae = CellwiseVae()
    z = torch.randn(2, 4, 20, 13, generator=torch.Generator().manual_seed(0))
    (whole,) = NODES["VAEDecode"](CTX, samples={"samples": z}, vae=vae).outputs
    (tiled,) = NODES["VAEDecodeTiled"](CTX, samples={"samples": z}, vae=vae, tile_size=tile, overlap=overlap).outputs
    assert tiled.shape == whole.shape == (2, 160, 104, 3)
    torch.testing.assert_close(tiled, whole)


@pytest.mark.parametrize("overlap", [16, 64])
def test_a_cellwise_vae_encodes_tiled_exactly_as_whole(overlap: int) -> None:
    vae = CellwiseVae()
    pixels = torch.rand(1, 200, 136, 3, generator=torch.Generator().manual_seed(1))
    (whole,) = NODES["VAEEncode"](CTX, pixels=pixels, vae=vae).outputs
    (tiled,) = NODES["VAEEncodeTiled"](CTX, pixels=pixels, vae=vae, tile_size=64, overlap=overlap).outputs
    assert tiled["samples"].shape == whole["samples"].shape == (1, 4, 25, 17)
    torch.testing.assert_close(tiled["samples"], whole["samples"])


def test_tiles_that_see_their_neighbours_do_show(tmp_path: Path) -> None:
    """The same tiling with a real (tiny, random) VAE: within one tile it equals VAEDecode / VAEEncode; over
    several tiles the result differs from the whole, as ComfyUI's does, but stays finite and in range."""
    from tui_diffusion.pipeline import checkpoint_writer_dit as w
    from tui_diffusion.pipeline.models import load_vae

    vae = load_vae(w.write_vae16(tmp_path / "vae.safetensors", flux=False), CPU, tmp_path / "cfg")
    z = torch.randn(1, vae.latent_channels, 6, 5, generator=torch.Generator().manual_seed(2))
    (whole,) = NODES["VAEDecode"](CTX, samples={"samples": z}, vae=vae).outputs
    (one_tile,) = NODES["VAEDecodeTiled"](CTX, samples={"samples": z}, vae=vae, tile_size=512).outputs
    torch.testing.assert_close(one_tile, whole)
    big = torch.randn(1, vae.latent_channels, 24, 20, generator=torch.Generator().manual_seed(3))
    (tiled,) = NODES["VAEDecodeTiled"](CTX, samples={"samples": big}, vae=vae, tile_size=64, overlap=16).outputs
    assert tiled.shape == (1, 24 * vae.downscale, 20 * vae.downscale, 3) and torch.isfinite(tiled).all()
    assert 0 <= float(tiled.min()) and float(tiled.max()) <= 1
    pixels = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(4))
    (enc,) = NODES["VAEEncode"](CTX, pixels=pixels, vae=vae).outputs
    (enc_tiled,) = NODES["VAEEncodeTiled"](CTX, pixels=pixels, vae=vae, tile_size=512).outputs
    torch.testing.assert_close(enc_tiled["samples"], enc["samples"])


def test_a_latent_of_another_family_is_a_clear_error() -> None:
    from tui_diffusion.pipeline.errors import NodeError

    with pytest.raises(NodeError, match="16 channels but this VAE takes 4"):
        NODES["VAEDecodeTiled"](CTX, samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=CellwiseVae())

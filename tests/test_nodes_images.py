"""Image nodes against ComfyUI's formulas, hand-computed values, and kornia's Canny (a stored reference)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from tests.test_nodes_more import run
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.nodes_images import (
    canny,
    empty_image,
    image_batch,
    image_blur,
    image_composite_masked,
    image_crop,
    image_invert,
    image_pad_for_outpaint,
    image_scale_to_total_pixels,
    image_sharpen,
    image_stitch,
)
from tui_diffusion.settings import DevicePolicy

DATA = Path(__file__).parent / "data"
CPU = resolve_device(DevicePolicy("cpu"))
CTX = NodeContext(None, "1", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]


def out(result: object, index: int = 0) -> torch.Tensor:
    return result.outputs[index]  # type: ignore[attr-defined]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_scale_to_total_pixels() -> None:
    image = rand(1, 50, 100, 3)
    # sqrt(0.01 * 2^20 / 5000) = 1.4482: 144.8 x 72.4 pixels
    scaled = out(image_scale_to_total_pixels(CTX, image, "nearest-exact", 0.01))
    assert scaled.shape == (1, 72, 145, 3)
    assert torch.equal(scaled, F.interpolate(image.movedim(-1, 1), size=(72, 145), mode="nearest-exact")
                       .movedim(1, -1))
    assert out(image_scale_to_total_pixels(CTX, image, "bilinear", 0.01, 8)).shape == (1, 72, 144, 3)
    assert out(image_scale_to_total_pixels(CTX, image, "area", 1.0)).shape == (1, 724, 1448, 3)


def test_pad_for_outpaint_mask_and_feathering() -> None:
    image = rand(1, 8, 8, 3)
    padded, mask = image_pad_for_outpaint(CTX, image, left=4, top=0, right=0, bottom=2, feathering=2).outputs
    assert padded.shape == (1, 10, 12, 3) and mask.shape == (1, 10, 12)
    assert torch.equal(padded[:, :8, 4:], image)
    assert (padded[:, :, :4] == 0.5).all() and (padded[:, 8:] == 0.5).all()
    assert (mask[0, :, :4] == 1).all() and (mask[0, 8:] == 1).all()
    # inside: d = min(column, 8 - row) (only the left and bottom are padded); ((2 - d) / 2)^2 where d < 2
    expected = torch.zeros(8, 8)
    for i in range(8):
        for j in range(8):
            d = min(j, 8 - i)
            expected[i, j] = ((2 - d) / 2) ** 2 if d < 2 else 0.0
    assert torch.equal(mask[0, :8, 4:], expected)
    assert expected[0, 0] == 1.0 and expected[0, 1] == 0.25 and expected[7, 5] == 0.25
    # no feathering, or a feathering over half the image: the image area is left unmasked
    for feathering in (0, 4):
        _, plain = image_pad_for_outpaint(CTX, image, 4, 0, 0, 2, feathering).outputs
        assert (plain[0, :8, 4:] == 0).all()


def test_crop_clips_to_the_image() -> None:
    image = rand(2, 10, 12, 3)
    assert torch.equal(out(image_crop(CTX, image, 4, 3, 5, 2)), image[:, 2:5, 5:9])
    assert torch.equal(out(image_crop(CTX, image, 512, 512, 100, 100)), image[:, 9:, 11:])  # x, y clamped


def test_blur_is_comfyuis_gaussian() -> None:
    """An impulse blurred gives the kernel: exp(-d^2 / (2 sigma^2)) over coordinates -1..1 across the kernel."""
    image = torch.zeros(1, 7, 7, 3)
    image[0, 3, 3] = 1.0
    blurred = out(image_blur(CTX, image, blur_radius=1, sigma=1.0))[0, :, :, 0]
    g = torch.tensor([[math.exp(-(x * x + y * y) / 2) for x in (-1, 0, 1)] for y in (-1, 0, 1)])
    assert torch.allclose(blurred[2:5, 2:5], g / g.sum(), atol=1e-6)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    flat = torch.full((1, 6, 6, 3), 0.3)
    assert torch.allclose(out(image_blur(CTX, flat, 3, 2.0)), flat, atol=1e-6)  # edges mirrored: no dark rim
    with pytest.raises(NodeError, match="radius of 9"):
        image_blur(CTX, flat, 9, 1.0)


def test_sharpen_kernel() -> None:
    flat = torch.full((1, 6, 6, 3), 0.4)
    assert torch.allclose(out(image_sharpen(CTX, flat, 2, 1.0, 1.0)), flat, atol=1e-5)  # the kernel sums to 1
    image = torch.zeros(1, 5, 5, 3)
    image[0, 2, 2] = 0.05
    g = torch.tensor([[math.exp(-(x * x + y * y) / 2) for x in (-1, 0, 1)] for y in (-1, 0, 1)])
    g = g / g.sum()
    alpha = 0.1  # centre weight: 1 + 10 alpha (1 - g_centre); neighbours -10 alpha g: clamped to 0
    sharp = out(image_sharpen(CTX, image, 1, 1.0, alpha))[0, :, :, 0]
    assert sharp[2, 2].item() == pytest.approx(0.05 * (1 + 10 * alpha * (1 - g[1, 1].item())), rel=1e-5)
    assert (sharp[1:4, 1:4].flatten()[[0, 1, 2, 3, 5, 6, 7, 8]] == 0).all()


def test_batch_resizes_and_matches_channels() -> None:
    a, b = rand(1, 8, 8, 3), rand(2, 8, 8, 3, seed=1)
    assert torch.equal(out(image_batch(CTX, a, b)), torch.cat([a, b]))
    c = rand(1, 4, 8, 3, seed=2)  # wider: centre-cropped to a square, then bilinear to 8x8
    expected = F.interpolate(c.movedim(-1, 1)[:, :, :, 2:6], size=(8, 8), mode="bilinear").movedim(1, -1)
    assert torch.allclose(out(image_batch(CTX, a, c))[1:], expected)
    rgba = out(image_batch(CTX, rand(1, 8, 8, 4, seed=3), a))
    assert rgba.shape == (2, 8, 8, 4) and (rgba[1, ..., 3] == 1).all()


def test_stitch_directions_spacing_and_sizes() -> None:
    # image2 is matched through Lanczos in 8-bit levels (ComfyUI's PIL path) even at its own size
    a, b = rand(1, 4, 6, 3), (rand(1, 4, 2, 3, seed=1) * 255).round() / 255
    assert torch.equal(out(image_stitch(CTX, a, "right", True, 0, "white", b)), torch.cat([a, b], dim=2))
    assert torch.equal(out(image_stitch(CTX, a, "left", True, 0, "white", b)), torch.cat([b, a], dim=2))
    spaced = out(image_stitch(CTX, a, "right", True, 2, "red", b))
    assert spaced.shape == (1, 4, 10, 3) and (spaced[0, :, 6:8] == torch.tensor([1.0, 0, 0])).all()
    assert out(image_stitch(CTX, a, "right", True, 3, "black", b)).shape == (1, 4, 12, 3)  # width made even
    # matched: image2 scaled to image1's width when stacked (4x2 -> 6 wide, 12 high)
    assert out(image_stitch(CTX, a, "down", True, 0, "white", b)).shape == (1, 16, 6, 3)
    # not matched: the narrower one padded (centred) with the spacing colour's grey level
    down = out(image_stitch(CTX, a, "up", False, 0, "white", b))
    assert down.shape == (1, 8, 6, 3)
    assert torch.equal(down[:, :4, 2:4], b) and (down[:, :4, :2] == 1).all() and torch.equal(down[:, 4:], a)
    two = out(image_stitch(CTX, rand(2, 4, 6, 3, seed=2), "right", True, 0, "white", b))
    assert two.shape == (2, 4, 8, 3) and torch.equal(two[1, :, 6:], b[0])  # the shorter batch repeats its last
    assert out(image_stitch(CTX, a, "right", True, 0, "white", None)) is a


def test_composite_masked() -> None:
    dest, src = torch.zeros(1, 6, 8, 3), torch.ones(1, 3, 3, 3)
    pasted = out(image_composite_masked(CTX, dest, src, 6, 1, False))
    expected = dest.clone()
    expected[:, 1:4, 6:8] = 1.0  # the part outside the destination is dropped
    assert torch.equal(pasted, expected)
    half = torch.tensor([[1.0, 0.0, 0.5]]).expand(3, 3)  # per column: all, nothing, half
    masked = out(image_composite_masked(CTX, dest, src, 0, 0, False, half))
    assert masked[0, 0, :3, 0].tolist() == [1.0, 0.0, 0.5] and (masked[0, 3:] == 0).all()
    assert (out(image_composite_masked(CTX, dest, src, 0, 0, True)) == 1).all()  # resized to the destination
    assert dest.sum() == 0  # the input is not modified


def test_empty_image_and_invert() -> None:
    img = out(empty_image(CTX, 5, 3, 2, 0xFF8000))
    assert img.shape == (2, 3, 5, 3) and torch.allclose(img[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0]))
    assert torch.allclose(out(image_invert(CTX, img))[0, 0, 0], torch.tensor([0.0, 127 / 255, 1.0]))


def test_canny_equals_kornias_on_the_reference() -> None:
    """tests/data/canny_kornia_reference.safetensors: kornia 0.9's filters.canny (ComfyUI's Canny calls it with
    its defaults) on two synthetic images; ours gives the same edge pixels."""
    ref = load_file(str(DATA / "canny_kornia_reference.safetensors"))
    image = ref["image"].float() / 255
    for low, high in ((0.4, 0.8), (0.1, 0.3)):
        expected = ref[f"edges_{low}_{high}"].float()
        assert torch.equal(canny(image, low, high), expected)


def test_canny_on_shapes() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    edges = canny(image, 0.4, 0.8)[0, 0]
    ys, xs = torch.nonzero(edges, as_tuple=True)
    assert len(ys) > 40  # the square's outline
    # every edge pixel lies next to the square's border, none in its flat middle or outside
    border = torch.minimum(torch.minimum((ys - 7.5).abs(), (ys - 23.5).abs()),
                           torch.minimum((xs - 7.5).abs(), (xs - 23.5).abs()))
    assert border.max() <= 1.0
    assert canny(torch.full((1, 3, 16, 16), 0.5), 0.1, 0.2).sum() == 0
    assert canny(image * 0.1, 0.4, 0.8).sum() == 0  # a faint square is under the thresholds


def test_workflow_composites_and_finds_edges(tmp_path: Path) -> None:
    """EmptyImage x2 -> ImageCompositeMasked -> ImageBlur -> Canny -> SaveImage, through the executor."""
    engine = EngineState(CPU, ModelCache(2), ModelPaths(tmp_path / "models", tmp_path / "in"), tmp_path / "out",
                         tmp_path / "tmp", tmp_path / "cfg")
    data = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                      "color": 0xFFFFFF}},
        "3": {"class_type": "ImageCompositeMasked",
              "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 16, "y": 12, "resize_source": False}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["3", 0], "blur_radius": 1, "sigma": 0.5}},
        "5": {"class_type": "Canny", "inputs": {"image": ["4", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "edges"}},
    }
    report = run(Executor(engine), data)
    saved = np.asarray(Image.open(report.outputs[0]))
    assert saved.shape == (40, 48, 3) and set(np.unique(saved)) == {0, 255}
    ys, xs = np.nonzero(saved[..., 0])
    assert ys.min() >= 10 and ys.max() <= 29 and xs.min() >= 14 and xs.max() <= 33  # around the pasted square


def test_ui_format_widgets_map_to_the_inputs_in_comfyuis_order() -> None:
    """A graph as ComfyUI's editor saves it: widget values are matched to the inputs in each node's declared
    order, so the specs must list the widgets in ComfyUI's order."""
    from tui_diffusion.graph.ui_format import ui_to_api

    def n(node_id: int, kind: str, widgets: list, inputs: list | None = None) -> dict:
        return {"id": node_id, "type": kind, "mode": 0, "widgets_values": widgets,
                "inputs": [{"name": name, "type": t, "link": link} for name, t, link in inputs or []],
                "outputs": []}

    ui = {"nodes": [
        n(1, "LoadImage", ["example.png", "image"]),
        n(2, "UpscaleModelLoader", ["RealESRGAN_x4plus.pth"]),
        n(3, "ImageUpscaleWithModel", [], [("upscale_model", "UPSCALE_MODEL", 1), ("image", "IMAGE", 2)]),
        n(4, "ImagePadForOutpaint", [0, 128, 64, 8, 40], [("image", "IMAGE", 3)]),
        n(5, "GrowMask", [-3, False], [("mask", "MASK", 4)]),
        n(6, "ImageStitch", ["down", False, 4, "red"], [("image1", "IMAGE", 3)]),
        n(7, "Canny", [0.2, 0.6, "cpu"], [("image", "IMAGE", 3)]),
        n(8, "LatentCompositeMasked", [64, 32, True]),
        n(9, "ImageScaleToTotalPixels", ["lanczos", 2.5, 8], [("image", "IMAGE", 3)]),
    ], "links": [[1, 2, 0, 3, 0, "UPSCALE_MODEL"], [2, 1, 0, 3, 1, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                 [4, 4, 1, 5, 0, "MASK"]]}
    api = ui_to_api(ui)
    assert api["2"]["inputs"] == {"model_name": "RealESRGAN_x4plus.pth"}
    assert api["3"]["inputs"] == {"upscale_model": ["2", 0], "image": ["1", 0]}
    assert api["4"]["inputs"] == {"image": ["3", 0], "left": 0, "top": 128, "right": 64, "bottom": 8,
                                  "feathering": 40}
    assert api["5"]["inputs"] == {"mask": ["4", 1], "expand": -3, "tapered_corners": False}
    assert {k: v for k, v in api["6"]["inputs"].items() if k != "image1"} == {
        "direction": "down", "match_image_size": False, "spacing_width": 4, "spacing_color": "red"}
    assert api["7"]["inputs"] == {"image": ["3", 0], "low_threshold": 0.2, "high_threshold": 0.6, "device": "cpu"}
    assert api["8"]["inputs"] == {"x": 64, "y": 32, "resize_source": True}
    assert api["9"]["inputs"] == {"image": ["3", 0], "upscale_method": "lanczos", "megapixels": 2.5,
                                  "resolution_steps": 8}

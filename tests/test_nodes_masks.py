"""Mask nodes against ComfyUI's formulas (and scipy's grey morphology, which ComfyUI's GrowMask calls)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from tests.test_nodes_more import run
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.nodes_masks import (
    crop_mask,
    feather_mask,
    grow_mask,
    image_color_to_mask,
    image_to_mask,
    invert_mask,
    mask_composite,
    mask_preview,
    mask_to_image_node,
    solid_mask,
    threshold_mask,
)
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
CTX = NodeContext(None, "1", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]


def out(result: object) -> torch.Tensor:
    return result.outputs[0]  # type: ignore[attr-defined]


def engine(tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(2), ModelPaths(tmp_path / "models", tmp_path / "in"), tmp_path / "out",
                       tmp_path / "tmp", tmp_path / "cfg")


def test_solid_and_invert() -> None:
    mask = out(solid_mask(CTX, 0.25, 5, 3))
    assert mask.shape == (1, 3, 5) and (mask == 0.25).all()
    assert (out(invert_mask(CTX, mask)) == 0.75).all()


@pytest.mark.parametrize(("operation", "expected"), [
    ("multiply", [0.3 * 0.8, 0.0]), ("add", [1.0, 0.3]), ("subtract", [0.0, 0.3]),
    ("and", [0.0, 0.0]), ("or", [1.0, 0.0]), ("xor", [1.0, 0.0]),
])
def test_mask_composite_operations(operation: str, expected: list[float]) -> None:
    """destination 0.3 everywhere; a 3x3 source (0.8 in the first two of its first row, else 0) at x=1, y=0,
    partly outside. and/or/xor round both first (0.3 -> 0, 0.8 -> 1); the result is clamped to 0..1."""
    dest = torch.full((1, 2, 3), 0.3)
    source = torch.zeros(1, 3, 3)
    source[:, 0, :2] = 0.8
    result = out(mask_composite(CTX, dest, source, 1, 0, operation))
    assert result.shape == (1, 2, 3)
    assert result[0, 0, 1].item() == pytest.approx(expected[0])  # covered by the source's 0.8
    assert result[0, 0, 0].item() == pytest.approx(0.3)  # left of x: untouched
    assert result[0, 1, 2].item() == pytest.approx(expected[1])  # the source's 0 there


def test_feather_ramps_as_comfyui() -> None:
    mask = torch.ones(1, 4, 6)
    left = out(feather_mask(CTX, mask, 3, 0, 0, 0))
    assert left[0, 0].tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    # ComfyUI's right ramp indexes from the end with -i, i = 0..n-1: column 0 gets 1/n, the last 2/n, ...
    right = out(feather_mask(CTX, mask, 0, 0, 2, 0))
    assert right[0, 0].tolist() == pytest.approx([0.5, 1, 1, 1, 1, 1.0])
    right3 = out(feather_mask(CTX, mask, 0, 0, 3, 0))
    assert right3[0, 0].tolist() == pytest.approx([1 / 3, 1, 1, 1, 1, 2 / 3])
    top = out(feather_mask(CTX, mask, 0, 2, 0, 0))
    assert top[0, :, 0].tolist() == pytest.approx([0.5, 1, 1, 1])
    assert out(feather_mask(CTX, mask, 99, 0, 0, 0))[0, 0, -1].item() == pytest.approx(1.0)  # capped at the width


@pytest.mark.parametrize("tapered", [True, False])
@pytest.mark.parametrize("expand", [3, -2, 0])
def test_grow_mask_equals_scipy_grey_morphology(expand: int, tapered: bool) -> None:
    rng = np.random.default_rng(1)
    masks = (rng.random((2, 12, 15)) > 0.8).astype(np.float32) * rng.random((2, 12, 15)).astype(np.float32)
    c = 0 if tapered else 1
    footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    expected = []
    for m in masks:
        for _ in range(abs(expand)):
            m = (scipy.ndimage.grey_dilation if expand > 0 else scipy.ndimage.grey_erosion)(m, footprint=footprint)
        expected.append(m)
    grown = out(grow_mask(CTX, torch.from_numpy(masks), expand, tapered))
    assert np.array_equal(grown.numpy(), np.stack(expected))


def test_grow_one_pixel_by_hand() -> None:
    mask = torch.zeros(5, 5)
    mask[2, 2] = 1.0
    cross = out(grow_mask(CTX, mask, 1, True))[0]
    assert cross.sum() == 5 and cross[1, 2] == 1 and cross[1, 1] == 0
    assert out(grow_mask(CTX, mask, 1, False))[0].sum() == 9


def test_threshold_crop_and_conversions() -> None:
    mask = torch.tensor([[[0.2, 0.5, 0.7]]])
    assert out(threshold_mask(CTX, mask, 0.5)).tolist() == [[[0.0, 0.0, 1.0]]]
    big = torch.arange(30.0).reshape(1, 5, 6)
    assert torch.equal(out(crop_mask(CTX, big, 2, 1, 3, 2)), big[:, 1:3, 2:5])
    with pytest.raises(NodeError, match="outside"):
        crop_mask(CTX, big, 6, 0, 3, 2)
    image = torch.rand(2, 4, 5, 3)
    assert torch.equal(out(image_to_mask(CTX, image, "green")), image[..., 1])
    with pytest.raises(NodeError, match="no alpha channel"):
        image_to_mask(CTX, image, "alpha")
    as_image = out(mask_to_image_node(CTX, big[0]))
    assert as_image.shape == (1, 5, 6, 3) and torch.equal(as_image[..., 2], big)


def test_image_color_to_mask() -> None:
    image = torch.zeros(1, 2, 2, 3)
    image[0, 0, 0] = torch.tensor([1.0, 128 / 255, 0.0])  # 0xFF8000
    image[0, 1, 1] = torch.tensor([1.0, 128.4 / 255, 0.0])  # rounds to the same 8-bit colour
    image[0, 1, 0] = torch.tensor([1.0, 129 / 255, 0.0])
    assert out(image_color_to_mask(CTX, image, 0xFF8000)).tolist() == [[[1.0, 0.0], [0.0, 1.0]]]


def test_mask_preview_writes_grey_images(tmp_path: Path) -> None:
    mask = torch.zeros(2, 4, 6)
    mask[1, :, 3:] = 1.0
    result = mask_preview(NodeContext(engine(tmp_path), "9", {"9": {"class_type": "MaskPreview", "inputs": {}}},
                                      report=lambda *a: None, interrupted=lambda: False), mask)
    assert len(result.files) == 2 and all(Path(f).parent == tmp_path / "tmp" for f in result.files)
    second = np.asarray(Image.open(result.files[1]))
    assert second.shape == (4, 6, 3) and (second[:, 3:] == 255).all() and (second[:, :3] == 0).all()


def test_workflow_builds_a_mask(tmp_path: Path) -> None:
    """SolidMask x2 -> MaskComposite -> GrowMask -> FeatherMask -> MaskToImage -> SaveImage, through the
    executor."""
    data = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 24}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
        "3": {"class_type": "MaskComposite",
              "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 12, "y": 8, "operation": "add"}},
        "4": {"class_type": "GrowMask", "inputs": {"mask": ["3", 0], "expand": 2, "tapered_corners": False}},
        "5": {"class_type": "ThresholdMask", "inputs": {"mask": ["4", 0], "value": 0.5}},
        "6": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "mask"}},
        "8": {"class_type": "MaskPreview", "inputs": {"mask": ["5", 0]}},
    }
    report = run(Executor(engine(tmp_path)), data)
    assert len(report.outputs) == 2
    saved = np.asarray(Image.open(next(p for p in report.outputs if Path(p).name.startswith("mask_"))))
    ys, xs = np.nonzero(saved[..., 0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (6, 17, 10, 21)  # the 8x8 square grown by 2 each side
    assert len(ys) == 12 * 12

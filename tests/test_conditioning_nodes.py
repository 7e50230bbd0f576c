"""ConditioningAverage, Concat, SetArea, SetAreaPercentage, SetAreaStrength and SetMask (issue 16, item 4):
the embeddings they build, and how the sampler blends area/mask entries as ComfyUI's ``calc_cond_batch``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.conftest import TINY
from tui_diffusion.families.base import Family
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline import nodes_conditioning as nc
from tui_diffusion.pipeline.context import EngineState, NodeContext
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.ksampler import Denoiser, ksampler
from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
from tui_diffusion.pipeline.nodes import clip_text_encode
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))
CTX: Any = None  # the conditioning nodes do not read their context


def test_average_blends_embeddings_and_pooled_and_pads_the_shorter_from() -> None:
    to = torch.arange(12.0).reshape(1, 3, 4)
    src = torch.full((1, 2, 4), 10.0)
    out = nc.conditioning_average(CTX, [[to, {"pooled_output": torch.ones(1, 4)}]],
                                  [[src, {"pooled_output": torch.zeros(1, 4)}]], 0.25).outputs[0]
    padded = torch.cat([src, torch.zeros(1, 1, 4)], dim=1)  # from is zero-padded to to's 3 tokens
    assert torch.equal(out[0][0], to * 0.25 + padded * 0.75)
    assert torch.equal(out[0][1]["pooled_output"], torch.full((1, 4), 0.25))
    longer = torch.full((1, 5, 4), 2.0)  # a longer from is cut to to's length
    cut = nc.conditioning_average(CTX, [[to, {}]], [[longer, {"pooled_output": torch.ones(1, 4)}]], 0.5).outputs[0]
    assert torch.equal(cut[0][0], to * 0.5 + 1.0)
    assert torch.equal(cut[0][1]["pooled_output"], torch.ones(1, 4))  # to has none: from's


def test_concat_appends_the_first_from_entrys_tokens() -> None:
    a, b = torch.zeros(1, 3, 4), torch.ones(1, 2, 4)
    out = nc.conditioning_concat(CTX, [[a, {"pooled_output": "keep"}]], [[b, {}], [a, {}]]).outputs[0]
    assert len(out) == 1 and out[0][1] == {"pooled_output": "keep"}
    assert torch.equal(out[0][0], torch.tensor([[[0.0] * 4] * 3 + [[1.0] * 4] * 2]))


def test_set_area_nodes_store_comfyuis_extras() -> None:
    c = [[torch.zeros(1, 1, 4), {}]]
    assert nc.conditioning_set_area(CTX, c, 200, 100, 17, 64, 0.5).outputs[0][0][1] == {
        "area": (12, 25, 8, 2), "strength": 0.5, "set_area_to_bounds": False}
    assert nc.conditioning_set_area_percentage(CTX, c, 0.5, 0.25, 0.5, 0.0).outputs[0][0][1]["area"] == (
        "percentage", 0.25, 0.5, 0.0, 0.5)
    assert nc.conditioning_set_area_strength(CTX, c, 3.0).outputs[0][0][1] == {"strength": 3.0}
    masked = nc.conditioning_set_mask(CTX, c, torch.ones(8, 8), 0.5, "mask bounds").outputs[0][0][1]
    assert masked["mask"].shape == (1, 8, 8) and masked["mask_strength"] == 0.5 and masked["set_area_to_bounds"]


# -- the blend, on a toy denoiser: each entry predicts x0 = its embedding's value everywhere -----------------------
class _Toy(Family):
    id, label = "toy", "toy"

    def __init__(self) -> None:
        self.crops: list[tuple[int, ...]] = []

    def model_kwargs(self, model: Any, entries: list, *, batch: int, latent_shape: tuple, negative: list,
                     device: Any, dtype: Any) -> dict:
        return {"values": [float(emb) for emb, _ in entries]}

    def apply_model(self, model: Any, x: torch.Tensor, timestep: Any, kwargs: dict) -> torch.Tensor:
        self.crops.append(tuple(x.shape[-2:]))
        n = len(kwargs["values"])
        return torch.cat([torch.full_like(c, v) for c, v in zip(x.chunk(n), kwargs["values"], strict=True)])


class _Identity:
    """Model sampling where the network's output is x0 itself."""

    def percent_to_sigma(self, p: float) -> float:
        return 1000.0 if p <= 0 else 0.0

    def calculate_input(self, sigma: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(self, sigma: Any, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma


def _toy_x0(positive: list, negative: list | None = None, cfg: float = 1.0) -> tuple[torch.Tensor, _Toy]:
    fam = _Toy()
    model = SimpleNamespace(family=fam, model_sampling=_Identity(), device=CPU, denoise_mask_function=None,
                            unet=None, patches=())
    latent = torch.zeros(1, 4, 16, 16)
    den = Denoiser(model, positive, negative, cfg, latent, torch.zeros_like(latent), None)  # type: ignore[arg-type]
    return den(latent, torch.tensor([1.0])), fam


def test_area_predictions_are_blended_with_their_strength_and_a_fade_at_inner_edges() -> None:
    whole = [torch.tensor(1.0), {}]
    right = nc.conditioning_set_area(CTX, [[torch.tensor(3.0), {}]], 64, 128, 64, 0, 2.0).outputs[0]
    x0, fam = _toy_x0([whole] + right)
    assert (16, 8) in fam.crops  # the area entry saw only its crop of the latent
    assert torch.allclose(x0[..., :8], torch.ones(1, 4, 16, 8))
    # column 8 is the area's inner edge: ComfyUI fades over min(8, 8 // 4) = 2 cells (x0.5, then x1)
    assert torch.allclose(x0[..., 8], torch.full((1, 4, 16), (1 + 3 * 1.0) / 2))
    assert torch.allclose(x0[..., 9:], torch.full((1, 4, 16, 7), (1 + 3 * 2.0) / 3))


def test_the_negative_gets_the_positive_areas_before_cfg() -> None:
    """ComfyUI copies the negative onto each positive area, so CFG inside the area compares like with like."""
    pos = [[torch.tensor(1.0), {}]] + nc.conditioning_set_area(CTX, [[torch.tensor(3.0), {}]], 64, 128, 64, 0,
                                                               2.0).outputs[0]
    x0, _ = _toy_x0(pos, [[torch.tensor(0.5), {}]], cfg=2.0)
    cond = torch.ones(1, 4, 16, 16)
    cond[..., 8], cond[..., 9:] = 2.0, 7 / 3
    assert torch.allclose(x0, 0.5 + (cond - 0.5) * 2.0)


def test_a_mask_weights_the_entry_by_mask_times_strength() -> None:
    mask = torch.zeros(32, 32)  # at twice the latent's size: resized as ComfyUI does (bilinear)
    mask[:, 16:] = 1.0
    masked = nc.conditioning_set_mask(CTX, [[torch.tensor(3.0), {}]], mask, 0.5).outputs[0]
    x0, fam = _toy_x0([[torch.tensor(1.0), {}]] + masked)
    assert torch.allclose(x0[..., :7], torch.ones(1, 4, 16, 7))
    assert torch.allclose(x0[..., 9:], torch.full((1, 4, 16, 7), (1 + 3 * 0.5) / 1.5))
    assert fam.crops == [(16, 16), (16, 16)]
    bounded = nc.conditioning_set_mask(CTX, [[torch.tensor(3.0), {}]], mask, 0.5, "mask bounds").outputs[0]
    x0_b, fam_b = _toy_x0([[torch.tensor(1.0), {}]] + bounded)
    assert (16, 8) in fam_b.crops and torch.allclose(x0_b[..., 9:], x0[..., 9:])


# -- on the tiny SD1 checkpoint ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = Path(tmp_path_factory.mktemp("cond"))
    engine = EngineState(CPU, ModelCache(2), ModelPaths(models_dir), tmp / "out", tmp / "tmp", tmp / "cfg")
    ctx = NodeContext(engine, "1", {}, lambda *_: None, lambda: False)
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp / "cfg")
    pos = clip_text_encode(ctx, "a red house", loaded.clip).outputs[0]
    neg = clip_text_encode(ctx, "blurry", loaded.clip).outputs[0]
    return ctx, loaded.model, pos, neg


def _sample(sd1: tuple, positive: list) -> torch.Tensor:
    ctx, model, _, neg = sd1
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return ksampler(ctx, model, 5, 3, 6.0, "euler", "normal", positive, neg, latent)["samples"]


def test_an_area_or_mask_over_the_whole_image_at_strength_1_equals_the_plain_conditioning(sd1: tuple) -> None:
    pos = sd1[2]
    plain = _sample(sd1, pos)
    for conditioning in (nc.conditioning_set_area(CTX, pos, 64, 64, 0, 0, 1.0).outputs[0],
                         nc.conditioning_set_area_percentage(CTX, pos).outputs[0],
                         nc.conditioning_set_mask(CTX, pos, torch.ones(64, 64)).outputs[0]):
        assert torch.allclose(_sample(sd1, conditioning), plain, rtol=1e-5, atol=1e-3)  # float rounding
    smaller = nc.conditioning_set_area(CTX, pos, 64, 32, 0, 32, 1.0).outputs[0]
    assert not torch.allclose(_sample(sd1, smaller + sd1[3]), plain, rtol=1e-3, atol=1e-1)

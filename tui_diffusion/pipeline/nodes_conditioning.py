"""Conditioning composition nodes (ComfyUI's ConditioningAverage, Concat, SetArea*, SetMask) and the area
arithmetic the sampler's Denoiser uses for them.

An entry's extras may hold ``area`` (latent cells ``(h, w, y, x)``, or ``("percentage", h, w, y, x)`` as
fractions of the latent), ``strength``, ``mask`` (``[B, H, W]``), ``mask_strength`` and
``set_area_to_bounds``. The sampler resolves them against the latent once (``resolve_entries``), evaluates
each such entry on its crop and blends the x0 predictions weighted by ``entry_weight``, as ComfyUI's
``calc_cond_batch`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.registry import NodeResult, node

#: the extras keys that make an entry need the area-aware evaluation
AREA_KEYS = ("area", "strength", "mask")


def _with(conditioning: list, **values: Any) -> list:
    return [[emb, {**extras, **values}] for emb, extras in conditioning]


@node("ConditioningAverage")
def conditioning_average(ctx: NodeContext, conditioning_to: list, conditioning_from: list,
                         conditioning_to_strength: float = 1.0) -> NodeResult:
    """Each ``to`` entry blended with the first ``from`` entry (cut or zero-padded to its token length)."""
    if not conditioning_from:
        raise NodeError("conditioning_from is empty")
    cond_from, extras_from = conditioning_from[0]
    pooled_from = extras_from.get("pooled_output")
    s = conditioning_to_strength
    out = []
    for emb, extras in conditioning_to:
        t0 = cond_from[:, : emb.shape[1]]
        if t0.shape[-1] != emb.shape[-1]:
            raise NodeError(f"ConditioningAverage: embeddings of width {emb.shape[-1]} and {t0.shape[-1]} "
                            "(different text encoders) cannot be averaged")
        if t0.shape[1] < emb.shape[1]:
            t0 = torch.cat([t0, torch.zeros(t0.shape[0], emb.shape[1] - t0.shape[1], emb.shape[2],
                                            dtype=t0.dtype, device=t0.device)], dim=1)
        new = dict(extras)
        pooled_to = extras.get("pooled_output", pooled_from)
        if pooled_from is not None and pooled_to is not None:
            new["pooled_output"] = pooled_to * s + pooled_from * (1 - s)
        elif pooled_from is not None:
            new["pooled_output"] = pooled_from
        out.append([emb * s + t0 * (1 - s), new])
    return NodeResult((out,))


@node("ConditioningConcat")
def conditioning_concat(ctx: NodeContext, conditioning_to: list, conditioning_from: list) -> NodeResult:
    """The first ``from`` entry's tokens appended to each ``to`` entry's (a longer prompt, as ComfyUI)."""
    if not conditioning_from:
        raise NodeError("conditioning_from is empty")
    cond_from = conditioning_from[0][0]
    out = []
    for emb, extras in conditioning_to:
        if cond_from.shape[-1] != emb.shape[-1]:
            raise NodeError(f"ConditioningConcat: embeddings of width {emb.shape[-1]} and {cond_from.shape[-1]} "
                            "(different text encoders) cannot be joined")
        out.append([torch.cat([emb, cond_from.to(emb)], dim=1), dict(extras)])
    return NodeResult((out,))


@node("ConditioningSetArea")
def conditioning_set_area(ctx: NodeContext, conditioning: list, width: int = 64, height: int = 64, x: int = 0,
                          y: int = 0, strength: float = 1.0) -> NodeResult:
    return NodeResult((_with(conditioning, area=(height // 8, width // 8, y // 8, x // 8), strength=strength,
                             set_area_to_bounds=False),))


@node("ConditioningSetAreaPercentage")
def conditioning_set_area_percentage(ctx: NodeContext, conditioning: list, width: float = 1.0, height: float = 1.0,
                                     x: float = 0.0, y: float = 0.0, strength: float = 1.0) -> NodeResult:
    return NodeResult((_with(conditioning, area=("percentage", height, width, y, x), strength=strength,
                             set_area_to_bounds=False),))


@node("ConditioningSetAreaStrength")
def conditioning_set_area_strength(ctx: NodeContext, conditioning: list, strength: float = 1.0) -> NodeResult:
    return NodeResult((_with(conditioning, strength=strength),))


@node("ConditioningSetMask")
def conditioning_set_mask(ctx: NodeContext, conditioning: list, mask: torch.Tensor, strength: float = 1.0,
                          set_cond_area: str = "default") -> NodeResult:
    if mask.dim() < 3:
        mask = mask.unsqueeze(0)
    return NodeResult((_with(conditioning, mask=mask, set_area_to_bounds=set_cond_area != "default",
                             mask_strength=strength),))


# -- the sampler's side ------------------------------------------------------------------------------------------
def _resolve(extras: dict, dims: tuple[int, int]) -> dict:
    """Percentage areas in latent cells, the mask at the latent's size (and its bounds as the area)."""
    out = dict(extras)
    area = out.get("area")
    if area is not None and area[0] == "percentage":
        h, w, y, x = area[1:]
        out["area"] = (max(1, round(h * dims[0])), max(1, round(w * dims[1])), round(y * dims[0]), round(x * dims[1]))
    mask = out.get("mask")
    if mask is not None:
        mask = mask.float()
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != dims:
            mask = F.interpolate(mask.unsqueeze(1), size=dims, mode="bilinear", align_corners=False).squeeze(1)
        if out.get("set_area_to_bounds", False):
            bounds = mask.abs().amax(dim=0) > 0.5
            rows, cols = torch.nonzero(bounds.any(1)).flatten(), torch.nonzero(bounds.any(0)).flatten()
            if rows.numel() == 0:
                out["area"] = (8, 8, 0, 0)  # nothing masked: the smallest area, a no-op
            else:
                y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
                out["area"] = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
        out["mask"] = mask
    return out


def _same_area_copies(entries: list, others: list) -> list:
    """ComfyUI's ``create_cond_with_same_area_if_none``: for each area entry of ``others``, an entry of
    ``entries`` (the smallest one whose area holds it, else the first without an area) copied onto that area, so
    that the positive and negative predictions of an area are blended alike."""
    added = []
    for _, extras in others:
        c_area = extras.get("area")
        if c_area is None:
            continue
        smallest = None
        for cand in entries + added:
            a = cand[1].get("area")
            if a is None:
                if smallest is None:
                    smallest = cand
                continue
            inside = (c_area[2] >= a[2] and c_area[3] >= a[3] and a[0] + a[2] >= c_area[0] + c_area[2]
                      and a[1] + a[3] >= c_area[1] + c_area[3])
            if inside and (smallest is None or "area" not in smallest[1]
                           or smallest[1]["area"][0] * smallest[1]["area"][1] > a[0] * a[1]):
                smallest = cand
        if smallest is None or smallest[1].get("area") == c_area:
            continue
        keep = {k: v for k, v in smallest[1].items() if k not in ("area", "strength", "mask", "mask_strength",
                                                                  "set_area_to_bounds")}
        placed = {k: extras[k] for k in ("area", "strength", "mask", "mask_strength") if k in extras}
        added.append([smallest[0], {**keep, **placed}])
    return added


def needs_areas(conds: list) -> bool:
    return any(k in extras for _, extras in conds for k in AREA_KEYS)


def resolve_entries(positive: list, negative: list | None, dims: tuple[int, int]) -> tuple[list, list | None]:
    """Both lists with their areas and masks resolved for a latent of ``dims`` cells, each side given entries
    for the other side's areas (as ComfyUI's ``process_conds``)."""
    pos = [[emb, _resolve(extras, dims)] for emb, extras in positive]
    if negative is None:
        return pos, None
    neg = [[emb, _resolve(extras, dims)] for emb, extras in negative]
    new_neg = neg + _same_area_copies(neg, pos)
    new_pos = pos + _same_area_copies(pos, neg)
    return new_pos, new_neg


def entry_area(extras: dict, dims: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The entry's crop ``(h, w, y, x)`` clamped to the latent, or None for the whole latent."""
    area = extras.get("area")
    if area is None:
        return None
    h, w, y, x = (int(v) for v in area)
    y, x = min(y, dims[0] - 1), min(x, dims[1] - 1)
    return max(1, min(dims[0] - y, h)), max(1, min(dims[1] - x, w)), y, x


def entry_weight(extras: dict, crop: torch.Tensor, area: tuple[int, int, int, int] | None,
                 dims: tuple[int, int]) -> torch.Tensor:
    """The weight of an entry's prediction over its crop (ComfyUI's ``get_area_and_mult``): the mask times its
    strength, times the entry's strength; an area without a mask fades in over up to 8 cells at inner edges."""
    strength = float(extras.get("strength", 1.0))
    mask = extras.get("mask")
    if mask is not None:
        mask = mask.to(crop.device, crop.dtype)[: crop.shape[0]]
        if area is not None:
            mask = mask[:, area[2]: area[2] + area[0], area[3]: area[3] + area[1]]
        mask = mask * float(extras.get("mask_strength", 1.0))
        mult = mask.unsqueeze(1).repeat(crop.shape[0] // mask.shape[0], crop.shape[1], 1, 1) * strength
        return mult
    mult = torch.ones_like(crop) * strength
    if area is None:
        return mult
    for i in range(2):
        size, offset = area[i], area[2 + i]
        rr = min(8, mult.shape[2 + i] // 4)
        if offset != 0:
            for t in range(rr):
                mult.narrow(2 + i, t, 1).mul_((t + 1) / rr)
        if size + offset < dims[i]:
            for t in range(rr):
                mult.narrow(2 + i, size - 1 - t, 1).mul_((t + 1) / rr)
    return mult

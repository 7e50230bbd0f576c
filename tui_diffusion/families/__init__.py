"""The model families, in detection order, and how a file finds its family.

A new family is one module with a ``Family`` subclass (see ``base.py``) and its configs, added to
``FAMILIES`` below. Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Iterable

from tui_diffusion.families.base import Family, Header, LatentFormat, UnsupportedFamily, as_header, has_prefix
from tui_diffusion.families.flux import FLUX
from tui_diffusion.families.lotus import LOTUS
from tui_diffusion.families.sd1 import SD1, SD1_INPAINT
from tui_diffusion.families.sd2 import SD2, SD2_INPAINT
from tui_diffusion.families.sd2_unclip import SD2_UNCLIP
from tui_diffusion.families.sd3 import SD3
from tui_diffusion.families.sdxl import SDXL, SDXL_REFINER

__all__ = ["FAMILIES", "Family", "LatentFormat", "UnsupportedFamily", "by_id", "detect", "register"]

#: every supported family, most specific first (the first whose ``matches`` says yes wins)
FAMILIES: list[Family] = [SD3, FLUX, LOTUS, SDXL, SDXL_REFINER, SD2_INPAINT, SD2_UNCLIP, SD2, SD1_INPAINT, SD1]


def register(family: Family, before: Family | None = None) -> None:
    """Add a family (before another one, where detection must try it first)."""
    if any(f.id == family.id for f in FAMILIES):
        raise ValueError(f"family {family.id!r} is registered twice")
    FAMILIES.insert(FAMILIES.index(before) if before is not None else len(FAMILIES), family)


def by_id(family_id: str) -> Family:
    for family in FAMILIES:
        if family.id == family_id:
            return family
    raise KeyError(f"unknown model family {family_id!r}")


# Architectures recognised only to say that they are not supported (when no registered family takes them).
_KNOWN_UNSUPPORTED = [
    (("joint_blocks.", "model.diffusion_model.joint_blocks."), "sd3", "SD3",
     "SD3-style transformer tensors (joint_blocks) without the layout of an SD3/SD3.5 file"),
]


def detect(keys: Header | Iterable[str]) -> Family:
    """The family of a single-file checkpoint from its tensors (names and, where given, shapes); an
    ``UnsupportedFamily`` says why none fits."""
    header = as_header(keys)
    for family in FAMILIES:
        if family.matches(header):
            return family
    for prefixes, fid, label, reason in _KNOWN_UNSUPPORTED:
        if has_prefix(header, *prefixes):
            return UnsupportedFamily(fid, label, reason)
    if not has_prefix(header, "model.diffusion_model."):
        return UnsupportedFamily("unknown", "unknown",
                                 "no Stable Diffusion UNet in it (no 'model.diffusion_model.*' tensors)")
    return UnsupportedFamily("unknown", "unknown", "a UNet without a known text encoder layout")

"""Which model family a single-file checkpoint belongs to (torch-free): a thin door to ``tui_diffusion.families``."""

from __future__ import annotations

from collections.abc import Iterable

from tui_diffusion.families import detect
from tui_diffusion.families.base import Family, Header
from tui_diffusion.families.sd2 import V_PRED_PROBE

__all__ = ["V_PRED_PROBE", "Family", "detect_family"]


def detect_family(keys: Header | Iterable[str], in_channels: int | None = None) -> Family:
    """The family of an original-layout checkpoint; an unsupported Family explains what it is.

    ``in_channels`` stands in for the UNet's input width where only tensor names are known.
    """
    from tui_diffusion.families.base import as_header
    from tui_diffusion.families.sd1 import CONV_IN
    from tui_diffusion.modelfiles.header import TensorInfo

    header = dict(as_header(keys))
    if in_channels is not None and header.get(CONV_IN) is None:
        header[CONV_IN] = TensorInfo("F32", (320, in_channels, 3, 3))
    return detect(header)

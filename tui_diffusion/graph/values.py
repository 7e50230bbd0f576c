"""Text to input values, by the input's spec (``--set``/``--sweep`` and the TUI's form fields)."""

from __future__ import annotations

import json
from typing import Any

from tui_diffusion.graph.specs import BOOLEAN, FLOAT, INT, InputSpec
from tui_diffusion.graph.workflow import nesting_error

#: longer than any integer an input takes (a 64-bit seed has 20 digits); longer ones are refused early
#: instead of being converted (slow, and over 4300 digits an error of its own)
MAX_INT_CHARS = 40


def parse_value(spec: InputSpec | None, text: str) -> Any:
    """Parse ``text`` as a value of ``spec``'s type; ValueError says why it cannot be one."""
    if spec is None:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, an integer over 4300 digits, nesting too deep
            return text
        return text if nesting_error(value) else value
    if spec.type == INT:
        if len(text.strip()) > MAX_INT_CHARS:
            raise ValueError(f"{text[:20]!r}... is too long for an integer ({len(text.strip())} characters)")
        try:
            return int(text.strip(), 0) if text.strip().lower().startswith("0x") else int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if spec.type == FLOAT:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if spec.type == BOOLEAN:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    return text

"""Node implementations of one area (specs in graph/specs_vision.py)."""

from __future__ import annotations

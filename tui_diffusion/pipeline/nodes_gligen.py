"""Node implementations of one area (specs in graph/specs_gligen.py)."""

from __future__ import annotations

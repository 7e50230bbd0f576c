"""Node implementations of one area (specs in graph/specs_merge.py)."""

from __future__ import annotations

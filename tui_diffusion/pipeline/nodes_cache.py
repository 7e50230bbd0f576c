"""Node implementations of one area (specs in graph/specs_cache.py)."""

from __future__ import annotations

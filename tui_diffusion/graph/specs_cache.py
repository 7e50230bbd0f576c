"""Node specs of one area (see graph/specs.py for the core set and the types)."""

from __future__ import annotations

from tui_diffusion.graph.specs import NodeSpec

SPECS: tuple[NodeSpec, ...] = ()

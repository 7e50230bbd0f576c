"""The runtime's supervisor under its historical name (``runtime.supervisor``). Torch-free."""

from __future__ import annotations

from tui_diffusion.runtime.supervisor import Supervisor, local_worker

__all__ = ["Supervisor", "local_worker"]

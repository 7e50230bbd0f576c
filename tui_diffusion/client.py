"""The local worker backend under its historical name (``backends.local``). Torch-free.

The app falls back to ``client.WorkerClient`` when its background server goes away; the runtime's
client API is ``runtime.supervisor.Supervisor``.
"""

from __future__ import annotations

from tui_diffusion.backends.local import WorkerClient, describe_exit
from tui_diffusion.runtime.protocol import WorkerDied

__all__ = ["WorkerClient", "WorkerDied", "describe_exit"]

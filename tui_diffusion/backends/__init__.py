"""Executor backends: where jobs run. Torch-free.

Every backend answers the protocol of ``runtime.protocol.Backend`` (start, wait_ready, submit, cancel,
move_to_front, next_event, close, ready) with the events of ``tui_diffusion.messages``, and only executes:
ids, the durable queue and restarts are the runtime's ``Supervisor``'s. ``local`` is one worker process
(``backends.local``); ``pool`` is several, one per GPU or N on the CPU (``backends.pool``); ``ray`` runs
one actor per GPU of a Ray cluster (``backends.ray_backend``, the optional ``ray`` extra); ``remote`` is a
background server's socket (``server.RemoteClient``). Adding one touches no screen code.
"""

from __future__ import annotations

from tui_diffusion.runtime.protocol import Backend

__all__ = ["Backend"]

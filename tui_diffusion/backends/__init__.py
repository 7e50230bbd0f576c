"""Executor backends: where jobs run. Torch-free.

Every backend answers the calls of ``WorkerClient`` (start, wait_ready, submit, cancel, move_to_front,
next_event, close, ready) with the events of ``tui_diffusion.messages``; the app and the CLI only ever
see that. ``local`` is one worker process (``client.WorkerClient``, supervised for ``run``); ``pool``
is several, one per GPU or N on the CPU (``backends.pool``); ``ray`` runs one actor per GPU of a Ray
cluster (``backends.ray_backend``, the optional ``ray`` extra). Adding one touches no screen code.
"""

from __future__ import annotations

from typing import Any, Protocol

from tui_diffusion import messages as m


class Backend(Protocol):
    ready: m.WorkerReady | None

    def start(self) -> None: ...

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady: ...

    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str: ...

    def cancel(self, job_id: str) -> None: ...

    def move_to_front(self, job_id: str) -> None: ...

    def next_event(self, timeout: float | None = None) -> Any: ...

    def close(self, timeout: float = 5.0) -> None: ...

"""The one interface every executor backend answers, and the events it streams. Torch-free.

A backend only executes: it takes jobs (``SubmitJob``), runs them somewhere (one worker process, a pool
of them, Ray actors, a background server) and streams ``tui_diffusion.messages`` events back. Ids, the
durable queue and restarts are the runtime's (``runtime.queue``, ``runtime.policy``,
``runtime.supervisor``), so adding a backend touches no screen and no command.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol, TypeAlias, runtime_checkable

from tui_diffusion import messages as m

#: what a backend's ``next_event`` returns: one message of ``tui_diffusion.messages`` (None: nothing yet)
Event: TypeAlias = Any


class WorkerDied(RuntimeError):
    """The worker process (or the server, or every worker of a pool) ended unexpectedly."""


@runtime_checkable
class Backend(Protocol):
    """Where jobs run. ``remote``: the jobs are a server's (it records and supervises them itself);
    ``records_queue``: the runtime writes the durable rows of the jobs submitted to it."""

    ready: m.WorkerReady | None
    remote: bool
    records_queue: bool

    def start(self) -> None: ...

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady: ...

    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str: ...

    def cancel(self, job_id: str) -> None: ...

    def move_to_front(self, job_id: str) -> None: ...

    def next_event(self, timeout: float | None = None) -> Event | None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class Unbatcher:
    """Events arrive one at a time or, from a worker's throttle, as a list: this hands them out one at a
    time, in order (the one place batches are unwrapped)."""

    def __init__(self) -> None:
        self._backlog: collections.deque[Event] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._backlog)

    def take(self, received: Event | list[Event] | None) -> Event | None:
        """The next event, given what was just received (None: nothing was)."""
        if isinstance(received, list):
            self._backlog.extend(received)
        elif received is not None:
            self._backlog.append(received)
        return self._backlog.popleft() if self._backlog else None

    def pop(self) -> Event | None:
        return self._backlog.popleft() if self._backlog else None

    def push_front(self, events: list[Event]) -> None:
        """Give back events taken early (while waiting for ready), to be seen first."""
        self._backlog.extendleft(reversed(events))

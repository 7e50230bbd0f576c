"""The messages that cross the process boundary between clients and the worker.

Small, frozen, picklable dataclasses and nothing else: workflows travel as plain API-format
dicts, images as file paths, previews as small PNG bytes. The same objects cross the worker's pipe,
a Ray queue and the background server's Unix socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# -- client -> worker -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SubmitJob:
    job_id: str
    workflow: dict[str, Any]
    #: Send a small PNG preview with progress events (the TUI wants them, the CLI does not).
    previews: bool = False


@dataclass(frozen=True)
class CancelJob:
    """Interrupt the job if it runs, remove it if it is pending."""

    job_id: str


@dataclass(frozen=True)
class MoveJob:
    """Move a pending job to the front of the queue."""

    job_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class StopServer:
    """Ask a background server to stop (its worker with it); sent by ``serve --stop``."""


# -- worker -> client -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerReady:
    device: str
    device_name: str
    dtype: str
    torch_version: str
    diffusers_version: str
    pid: int
    #: something the user should know (e.g. the history database was damaged and moved aside)
    notice: str | None = None


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start (or stopped on an internal error); with ``held`` (a list, maybe empty) the
    runtime gave up restarting it and these pending jobs were not run (in the store, for resume)."""

    message: str
    held: list[str] | None = None


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is no job's end (the history database was damaged and replaced)."""

    message: str


@dataclass(frozen=True)
class WorkerRestarted:
    """The worker died and a new one took its place; ``resubmitted`` are the pending jobs it was given."""

    reason: str
    resubmitted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ServerLost:
    """The background server this client was attached to went away; a worker of the client's own took its
    place (what the server had queued is in the store, held)."""

    reason: str


@dataclass(frozen=True)
class JobAccepted:
    job_id: str
    position: int


@dataclass(frozen=True)
class JobPlaced:
    """A pool gave the job to one of its workers (a process, a Ray actor)."""

    job_id: str
    worker: str


@dataclass(frozen=True)
class JobStarted:
    job_id: str


@dataclass(frozen=True)
class NodeStarted:
    job_id: str
    node_id: str


@dataclass(frozen=True)
class NodeCached:
    job_id: str
    node_id: str


@dataclass(frozen=True)
class NodeFinished:
    job_id: str
    node_id: str
    seconds: float


@dataclass(frozen=True)
class Progress:
    job_id: str
    node_id: str
    step: int
    total: int
    preview_png: bytes | None = None


@dataclass(frozen=True)
class JobFinished:
    job_id: str
    outputs: list[str]
    executed: list[str]
    cached: list[str]
    timings: dict[str, float]
    seconds: float
    #: "ok" or "interrupted"
    status: str = "ok"


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    node_id: str | None
    message: str
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRemoved:
    job_id: str


JobEnd = (JobFinished, JobFailed, JobRemoved)


# -- server -> attached clients ---------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSummary:
    """One job as a background server knows it: enough for a client that attaches later to show it."""

    job_id: str
    workflow: dict[str, Any]
    previews: bool = False
    #: pending, running, done, failed, interrupted, removed
    status: str = "pending"
    node_id: str | None = None
    step: int = 0
    total: int = 0
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    error_node: str | None = None
    seconds: float | None = None
    worker: str | None = None
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Attached:
    """The first message a client gets from a server: the worker (None while it starts) and every job."""

    ready: WorkerReady | None
    jobs: list[JobSummary]
    server_pid: int


@dataclass(frozen=True)
class JobQueued:
    """A job some attached client queued (each client learns of the others' jobs)."""

    job: JobSummary

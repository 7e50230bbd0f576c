"""The runtime's client API: what the app, ``run`` and ``serve`` call. Torch-free.

A ``Supervisor`` wraps a backend (one worker process, a pool, Ray actors, a background server) and adds
what no backend does: job ids and the durable rows (``runtime.queue``), and the supervision policy
(``runtime.policy``). When a worker dies (a segfault, the out-of-memory killer, ``kill -9``) the job it
was running fails with the cause, a new worker starts and the pending jobs go to it under the same ids;
a worker that keeps dying is given up on and the pending jobs are held. A background server that goes
away is handed over to a worker of this process's own (``fallback``), its jobs held in the store.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.runtime.policy import Decision, RestartPolicy
from tui_diffusion.runtime.protocol import Backend, Event, WorkerDied
from tui_diffusion.runtime.queue import FAILED, REMOVED, DurableQueue, make_job, open_queue, record_state
from tui_diffusion.settings import WorkerConfig

log = logging.getLogger("tui_diffusion.supervisor")

BackendFactory = Callable[[WorkerConfig], Backend]


def local_worker(config: WorkerConfig) -> Backend:
    """One worker process of this process's own (``client.WorkerClient``, looked up when called)."""
    from tui_diffusion import client

    return client.WorkerClient(config)


class Supervisor:
    """The calls of a backend (start, wait_ready, submit, cancel, move_to_front, next_event, close), with
    durable ids and one restart policy behind them."""

    remote = False

    def __init__(self, config: WorkerConfig, factory: BackendFactory = local_worker,
                 fallback: BackendFactory | None = None, policy: RestartPolicy | None = None,
                 record: bool | None = None, backend: Backend | None = None) -> None:
        """``factory`` makes the backend and its replacements; ``backend``: a first one made already."""
        self.config = config
        self.factory = factory
        #: what takes over when the backend turns out to be a background server and it goes away
        self.fallback = fallback
        self.policy = policy or RestartPolicy()
        self.backend: Backend = backend if backend is not None else factory(config)
        #: the runtime writes the jobs' rows unless told otherwise (a pool's slots: the pool's supervisor
        #: does) or the backend records them elsewhere (a server)
        self.records = self.backend.records_queue if record is None else record
        self.queue: DurableQueue | None = None
        self.notice: str | None = None
        if self.records:
            self.queue, self.notice = open_queue(config)
        self.pending: collections.OrderedDict[str, m.SubmitJob] = collections.OrderedDict()
        self.running: set[str] = set()
        #: the backend greeted us as a background server (its first event was Attached)
        self.attached = False
        #: why the supervisor gave up (it then raises WorkerDied with it)
        self.stopped: str | None = None
        #: close() was called: a worker that ends now was told to, and is not replaced
        self.closing = False
        self._out: collections.deque[Event] = collections.deque()

    @property
    def records_queue(self) -> bool:
        return self.records

    @property
    def ready(self) -> m.WorkerReady | None:
        return self.backend.ready

    @property
    def process(self) -> Any:
        """The worker process of a local backend (None for others)."""
        return getattr(self.backend, "process", None)

    @property
    def session(self) -> Any:
        """This process's claim on the jobs it queued (None without a store)."""
        return self.queue.session if self.queue is not None else None

    def start(self) -> None:
        self.backend.start()

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        return self.backend.wait_ready(timeout)

    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str:
        """Queue a job: in the store before it is acknowledged, then to the backend; returns its id."""
        job = make_job(workflow, previews, job_id)
        if self.queue is not None:
            self.queue.queued(job)
        self.pending[job.job_id] = job
        if self.stopped is None:  # given up: the job waits in the store for resume
            self.backend.submit(job.workflow, previews=job.previews, job_id=job.job_id)
        return job.job_id

    def cancel(self, job_id: str) -> None:
        self.backend.cancel(job_id)

    def move_to_front(self, job_id: str) -> None:
        if job_id in self.pending:
            self.pending.move_to_end(job_id, last=False)
        self.backend.move_to_front(job_id)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event; a dead worker shows as the lost job's failure and ``WorkerRestarted`` (or, given
        up on, ``WorkerFailed`` with the held jobs, and ``WorkerDied`` after that)."""
        if self._out:
            return self._out.popleft()
        if self.stopped is not None:
            raise WorkerDied(self.stopped)
        try:
            event = self.backend.next_event(timeout)
        except WorkerDied as exc:
            return self._lost(exc)
        self._note(event)
        return event

    def _note(self, event: Event | None) -> None:
        if isinstance(event, m.Attached):
            self.attached = True
        elif isinstance(event, m.JobStarted):
            self.pending.pop(event.job_id, None)
            self.running.add(event.job_id)
        elif isinstance(event, m.JobEnd):
            self.pending.pop(event.job_id, None)
            self.running.discard(event.job_id)
            if self.queue is not None:
                if isinstance(event, m.JobRemoved):  # a pool removes jobs no worker ever saw
                    self.queue.state(event.job_id, REMOVED)
                self.queue.ended(event.job_id)  # the worker recorded its end
            self.policy.job_ended()

    def _lost(self, exc: WorkerDied) -> Event:
        if self.closing:  # the app is quitting and told its worker to stop: no restart, no hand-over
            raise exc
        if self.attached:
            return self._hand_over(exc)
        for job_id in sorted(self.running):
            message = f"the worker crashed while running it: {exc}"
            self._record(job_id, FAILED, message)  # the dead worker cannot
            self._out.append(m.JobFailed(job_id, None, message))
        self.running.clear()
        if self.policy.died() is Decision.GIVE_UP:
            self.stopped = f"{exc}; it died {self.policy.count} times in a row, giving up"
            self._out.append(m.WorkerFailed(self.stopped, held=list(self.pending)))
            self.pending.clear()  # in the store under this session: left over for resume
            return self._out.popleft()
        self._replace(self.factory)
        self._out.append(m.WorkerRestarted(str(exc), list(self.pending)))
        for job in self.pending.values():
            self.backend.submit(job.workflow, previews=job.previews, job_id=job.job_id)
        return self._out.popleft()

    def _hand_over(self, exc: WorkerDied) -> Event:
        """The background server went away: go on with a worker of our own, or end if there is none to take."""
        if self.fallback is None:
            raise exc
        self.attached = False
        self.pending.clear()  # the server's; held in its store for R
        self.running.clear()
        self._replace(self.fallback)
        self.records = self.backend.records_queue
        if self.records and self.queue is None:
            self.queue, self.notice = open_queue(self.config)
        return m.ServerLost(str(exc))

    def _replace(self, factory: BackendFactory) -> None:
        self.backend.close(timeout=1.0)
        self.backend = factory(self.config)
        self.backend.start()

    def _record(self, job_id: str, state: str, error: str) -> None:
        if self.queue is not None:
            self.queue.state(job_id, state, error)
        else:
            record_state(self.config, job_id, state, error)

    def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        self.backend.close(timeout)
        if self.queue is not None:  # what was not run is left over for resume; the lock file goes
            self.queue.close()

"""A worker that comes back. Torch-free.

Same calls as ``WorkerClient``; when the worker process dies (a segfault, the out-of-memory killer,
``kill -9``) the job it was running fails with the cause, a new worker starts, and the pending jobs go
to it under the same ids. The headless runner and the background server use it; nothing is lost but the
one job that was running, and that one is reported, not dropped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.client import WorkerClient, WorkerDied
from tui_diffusion.settings import WorkerConfig


def record_lost(config: WorkerConfig, job_id: str, message: str) -> None:
    """Write a job that died with its worker into the store as failed (the worker cannot any more)."""
    if not config.record_history:
        return
    try:
        from tui_diffusion.store.history import History

        history = History(config.db_path)
        try:
            history.job_state(job_id, "error", message)
        finally:
            history.close()
    except Exception:  # the store is a record, never a reason to stop
        pass


def open_store(config: WorkerConfig | None) -> tuple[Any, Any]:
    """The queue store and a session of this process's own (the jobs it holds before a worker takes them:
    left over if this process dies), or nothing when there is no store."""
    store, session, _ = open_store_noting(config)
    return store, session


def open_store_noting(config: WorkerConfig | None) -> tuple[Any, Any, str | None]:
    """``open_store`` and what the user should be told about it: the database was damaged and moved aside,
    or it cannot be used at all (jobs then run unrecorded)."""
    if config is None or not config.record_history:
        return None, None, None
    try:
        from tui_diffusion.store.history import History, Session

        store = History(config.db_path)
        return store, Session(store.path), store.notice
    except Exception as exc:  # the store is a record; jobs run without it
        return None, None, (f"the run history is unavailable ({exc}); jobs run but are not recorded, and a "
                            "crash loses the queue")


def store_queued(store: Any, session: Any, job: m.SubmitJob) -> None:
    """Write a job to the durable queue before it is acknowledged; never fatal."""
    if store is None:
        return
    try:
        store.job_queued(job.job_id, job.workflow, session.id, job.previews)
    except Exception:
        pass


class Supervisor:
    #: more deaths than this within ``window`` seconds, with no job finished between: give up
    max_deaths = 3
    window = 120.0

    def __init__(self, config: WorkerConfig, factory: Callable[[WorkerConfig], Any] = WorkerClient,
                 durable: bool = True) -> None:
        self.config = config
        #: jobs go to the store at submit, before anyone acknowledges them (a pool that does it already
        #: passes durable=False)
        self.store, self.session, self.notice = open_store_noting(config) if durable else (None, None, None)
        self.factory = factory
        self.client: Any = factory(config)
        self.pending: collections.OrderedDict[str, m.SubmitJob] = collections.OrderedDict()
        self.running: str | None = None
        self.deaths: list[float] = []
        self._backlog: collections.deque[Any] = collections.deque()

    @property
    def ready(self) -> m.WorkerReady | None:
        return self.client.ready

    @property
    def process(self) -> Any:
        return self.client.process

    def start(self) -> None:
        self.client.start()

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        return self.client.wait_ready(timeout)

    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str:
        import uuid

        data = workflow.to_data() if hasattr(workflow, "to_data") else workflow
        job = m.SubmitJob(job_id or uuid.uuid4().hex[:12], data, previews)
        store_queued(self.store, self.session, job)
        self.client.submit(data, previews=previews, job_id=job.job_id)
        self.pending[job.job_id] = job
        return job.job_id

    def cancel(self, job_id: str) -> None:
        self.client.cancel(job_id)

    def move_to_front(self, job_id: str) -> None:
        if job_id in self.pending:
            self.pending.move_to_end(job_id, last=False)
        self.client.move_to_front(job_id)

    def next_event(self, timeout: float | None = None) -> Any:
        if self._backlog:
            return self._backlog.popleft()
        try:
            event = self.client.next_event(timeout)
        except WorkerDied as exc:
            return self._replace(exc)
        if isinstance(event, m.JobStarted):
            self.running = event.job_id
            self.pending.pop(event.job_id, None)
        elif isinstance(event, m.JobEnd):
            self.pending.pop(event.job_id, None)
            if self.store is not None:
                self.store.forget(event.job_id)  # the worker recorded its end
            if self.running == event.job_id:
                self.running = None
            self.deaths.clear()  # a job got through: the worker is not failing over and over
        return event

    def _replace(self, exc: WorkerDied) -> Any:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < self.window] + [now]
        lost = self.running
        self.running = None
        if lost is not None:
            message = f"the worker died while running it: {exc}"
            record_lost(self.config, lost, message)
            self._backlog.append(m.JobFailed(lost, None, message))
        if len(self.deaths) > self.max_deaths:
            if self._backlog:
                self._backlog.append(m.WorkerFailed(f"{exc}; it died {len(self.deaths)} times in a row, giving up"))
                return self._backlog.popleft()
            raise exc
        self.client.close(timeout=1.0)
        self.client = self.factory(self.config)
        self.client.start()
        self._backlog.append(m.WorkerRestarted(str(exc), list(self.pending)))
        for job in list(self.pending.values()):
            self.client.submit(job.workflow, previews=job.previews, job_id=job.job_id)
        return self._backlog.popleft()

    def close(self, timeout: float = 5.0) -> None:
        self.client.close(timeout)
        if self.session is not None:  # what was not run is left over for resume; the lock file goes
            self.session.close()

"""The job queue: job ids, the one vocabulary of job states, and the durable rows in SQLite. Torch-free.

Every write of the durable queue goes through ``DurableQueue``: the runtime's ``Supervisor`` writes a job
before it acknowledges it (so a client that dies right after ``submit`` loses nothing), a worker process
writes the jobs it accepts and their states as they change, the app discards held jobs, ``resume`` reads
what is left over. A row belongs to one session (a lock file held by a live process); a row held by a live
session stays with it when another process of the same chain accepts the job again, and a row of a dead
session is taken over by whoever queues the job again (``resume``, the app's R).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from tui_diffusion import messages as m

if TYPE_CHECKING:
    from tui_diffusion.settings import WorkerConfig
    from tui_diffusion.store.history import History, JobRow, Session

log = logging.getLogger("tui_diffusion.queue")

# -- the one vocabulary of job states -------------------------------------------------------------------------
PENDING, RUNNING, DONE, FAILED, INTERRUPTED, REMOVED = "pending", "running", "done", "failed", "interrupted", "removed"
#: left unfinished by a worker that is gone (a crash, a reboot, a closed terminal): waits for "resume"
HELD = "held"
FINAL = frozenset({DONE, FAILED, INTERRUPTED, REMOVED})
UNFINISHED = frozenset({PENDING, RUNNING})

#: the store's words for the states it keeps (rows written since version 1 say ok and error)
_TO_STORE = {DONE: "ok", FAILED: "error"}
_FROM_STORE = {v: k for k, v in _TO_STORE.items()}


def to_store(state: str) -> str:
    """The word the history database keeps for a state (``done`` is ``ok``, ``failed`` is ``error``)."""
    return _TO_STORE.get(state, state)


def from_store(status: str) -> str:
    """A stored row's status in the queue's vocabulary."""
    return _FROM_STORE.get(status, status)


def state_after(event: Any) -> str | None:
    """The state an event leaves its job in; None for an event that changes no job's state."""
    if isinstance(event, m.JobStarted):
        return RUNNING
    if isinstance(event, m.JobFinished):
        return DONE if event.status == "ok" else INTERRUPTED
    if isinstance(event, m.JobFailed):
        return FAILED
    if isinstance(event, m.JobRemoved):
        return REMOVED
    return None


# -- ids and jobs ----------------------------------------------------------------------------------------------
def new_job_id() -> str:
    """A job's id: unique across sessions (the store keeps every job), short enough to show."""
    return uuid.uuid4().hex[:12]


def make_job(workflow: Any, previews: bool = False, job_id: str | None = None) -> m.SubmitJob:
    """The message that queues ``workflow`` (a ``Workflow`` or API-format data), under a new id unless one is
    given (a resumed job keeps its own)."""
    data = workflow.to_data() if hasattr(workflow, "to_data") else workflow
    return m.SubmitJob(job_id or new_job_id(), data, previews)


# -- the durable rows ------------------------------------------------------------------------------------------
class DurableQueue:
    """One process's writes to the durable queue: the rows of the jobs it accepts, under a session of its
    own, and their states. With ``background`` the states go through a thread of their own (a worker never
    waits on the disk between steps), in order; ``flush`` waits for them."""

    def __init__(self, history: History | None, background: bool = False) -> None:
        from tui_diffusion.store.history import Session

        #: None: no store (history off, or unusable): every write is skipped
        self.history = history
        self.session: Session | None = Session(history.path) if history is not None else None
        self._tasks: queue.Queue[tuple[str, str, str | None]] | None = None
        if background and history is not None:
            self._tasks = queue.Queue()
            threading.Thread(target=self._drain, daemon=True, name="queue-store").start()

    @property
    def notice(self) -> str | None:
        """What the user should know about the database (it was damaged and moved aside)."""
        return self.history.notice if self.history is not None else None

    def queued(self, job: m.SubmitJob) -> None:
        """The job's row, written before anyone acknowledges the job; a failure is logged, never fatal (the
        job runs, unrecorded)."""
        if self.history is None or self.session is None:
            return
        try:
            self.history.job_queued(job.job_id, job.workflow, self.session.id, job.previews)
        except Exception:  # the store is a record, never a reason to refuse a job
            log.exception("could not write job %s to the queue store", job.job_id)

    def state(self, job_id: str, state: str, error: str | None = None) -> None:
        """A job's new state (the queue's vocabulary); written at once, or in order by the background thread."""
        if self._tasks is not None:
            self._tasks.put((job_id, state, error))
        else:
            self._write_state(job_id, state, error)

    def _write_state(self, job_id: str, state: str, error: str | None) -> None:
        if self.history is None:
            return
        try:
            self.history.job_state(job_id, to_store(state), error)
        except Exception:  # as in queued: the job goes on, the log says why its row is stale
            log.exception("could not record job %s as %s", job_id, state)

    def _drain(self) -> None:
        assert self._tasks is not None
        while True:
            job_id, state, error = self._tasks.get()
            try:
                self._write_state(job_id, state, error)
            finally:
                self._tasks.task_done()

    def ended(self, job_id: str) -> None:
        """Another process recorded the job's end: this one no longer writes it again after a recovery."""
        if self.history is not None:
            self.history.forget(job_id)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the states queued so far are written; False if ``timeout`` passed first."""
        return self._tasks is None or join_queue(self._tasks, timeout)

    def release(self) -> None:
        """Give up this process's claim: what it did not run is left over for ``resume``; the lock file goes."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def close(self) -> None:
        self.release()
        if self.history is not None:
            self.history.close()


def join_queue(tasks: queue.Queue[Any], timeout: float | None) -> bool:
    """``queue.Queue.join`` with a time limit."""
    if timeout is None:
        tasks.join()
        return True
    deadline = time.monotonic() + timeout
    with tasks.all_tasks_done:
        while tasks.unfinished_tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            tasks.all_tasks_done.wait(left)
    return True


def open_history(config: WorkerConfig | None) -> History:
    """The history database the settings name (raises ``StoreError`` or ``OSError`` when it cannot be used)."""
    from tui_diffusion.store.history import History

    return History(config.db_path if config is not None else None)


def open_queue(config: WorkerConfig | None, background: bool = False) -> tuple[DurableQueue | None, str | None]:
    """This process's durable queue and what the user should be told about it (the database was damaged and
    moved aside, or it cannot be used at all: jobs then run unrecorded); nothing when history is off."""
    if config is None or not config.record_history:
        return None, None
    try:
        durable = DurableQueue(open_history(config), background)
    except Exception as exc:  # the store is a record: jobs run without it, and the user is told
        log.error("the queue store is unavailable: %s", exc)
        return None, (f"the run history is unavailable ({exc}); jobs run but are not recorded, and a crash "
                      "loses the queue")
    return durable, durable.notice


def record_state(config: WorkerConfig, job_id: str, state: str, error: str | None = None) -> str | None:
    """Write one job's state from a process that holds no queue of its own (a job lost with its worker, a
    held job discarded); returns why it could not be written, None when it was."""
    if not config.record_history:
        return None
    try:
        history = open_history(config)
        try:
            history.job_state(job_id, to_store(state), error)
        finally:
            history.close()
    except Exception as exc:  # the store is a record; the caller decides whether to tell the user
        log.warning("could not record job %s as %s: %s", job_id, state, exc)
        return str(exc)
    return None


def left_over(config: WorkerConfig) -> list[JobRow]:
    """Jobs queued or running in a process that is gone (a crash, a reboot, a closed terminal), oldest first;
    none when history is off. Raises ``StoreError``/``OSError``/``sqlite3.Error`` when the store is unreadable."""
    if not config.record_history:
        return []
    history = open_history(config)
    try:
        return history.left_over()
    finally:
        history.close()


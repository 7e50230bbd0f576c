"""The one bridge between the app and the runtime: a thread reads the runtime's events and posts them as
Textual messages; widgets update in their handlers. The UI never waits on the worker, never opens the
database and never chooses a backend: restarts, the hand-over from a lost server and the durable queue
are the runtime's (``runtime.supervisor``, ``runtime.queue``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from textual.message import Message

from tui_diffusion.runtime import queue as jobqueue
from tui_diffusion.runtime.protocol import Event, WorkerDied
from tui_diffusion.runtime.supervisor import BackendFactory, Supervisor, local_worker
from tui_diffusion.settings import WorkerConfig

if TYPE_CHECKING:
    from tui_diffusion.store.history import History, JobRow

log = logging.getLogger("tui_diffusion.bridge")


class EngineEvent(Message):
    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class WorkerLost(Message):
    """The runtime ended for good (it could not start, or its server went away with nothing to take over)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class EngineBridge:
    def __init__(self, post: Callable[[Message], Any], config: WorkerConfig,
                 factory: BackendFactory = local_worker) -> None:
        self.post = post
        self.config = config
        self.factory = factory
        self.runtime: Supervisor | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Create the runtime now (commands queue up) and start its backend in the background; a server
        that goes away is handed over to a worker of the app's own."""
        self.runtime = Supervisor(self.config, self.factory, fallback=local_worker)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(self.runtime,), daemon=True, name="engine-bridge")
        self._thread.start()

    def _run(self, runtime: Supervisor) -> None:
        try:
            runtime.start()
        except Exception as exc:  # cannot even spawn: reported as the runtime's end
            log.exception("the worker could not be started")
            self.post(WorkerLost(f"the worker could not be started: {exc}"))
            return
        while not self._stop.is_set():
            try:
                event = runtime.next_event(timeout=0.2)
            except WorkerDied as exc:
                if not self._stop.is_set():
                    self.post(WorkerLost(str(exc)))
                return
            if event is not None:
                self.post(EngineEvent(event))

    def _runtime(self) -> Supervisor:
        if self.runtime is None:
            raise RuntimeError("the bridge has not been started")
        return self.runtime

    def submit(self, workflow: dict[str, Any], job_id: str | None = None, previews: bool = True) -> str:
        """Queue a job (a held one keeps its id); returns the id the queue gave it."""
        return self._runtime().submit(workflow, previews=previews, job_id=job_id)

    def cancel(self, job_id: str) -> None:
        self._runtime().cancel(job_id)

    def move_to_front(self, job_id: str) -> None:
        self._runtime().move_to_front(job_id)

    # -- the store, for the screens -------------------------------------------------------------------------
    def left_over(self) -> list[JobRow]:
        """Jobs a process that is gone left unfinished (none when the store cannot be read: said in the log,
        and the history screen says why)."""
        try:
            return jobqueue.left_over(self.config)
        except Exception as exc:  # sqlite3.Error, StoreError, OSError: no store, no held jobs
            log.warning("left-over jobs cannot be read: %s", exc)
            return []

    def discard(self, job_id: str) -> str | None:
        """Forget a held job (its row says removed); returns why that could not be recorded, if it could not."""
        return jobqueue.record_state(self.config, job_id, jobqueue.REMOVED, "discarded by the user")

    def open_history(self) -> History:
        """The run history for the history screen (raises ``StoreError``/``OSError`` when it cannot be opened)."""
        return jobqueue.open_history(self.config)

    def close(self) -> None:
        self._stop.set()
        if self.runtime is not None:
            self.runtime.close(timeout=2.0)

"""The one bridge between the app and the worker: a thread reads worker events and posts them as
Textual messages; widgets update in their handlers. The UI never waits on the worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from textual.message import Message

from tui_diffusion.client import WorkerClient, WorkerDied
from tui_diffusion.settings import WorkerConfig


class EngineEvent(Message):
    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class WorkerLost(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class EngineBridge:
    def __init__(self, post: Callable[[Message], Any], config: WorkerConfig,
                 factory: Callable[[WorkerConfig], Any] = WorkerClient) -> None:
        self.post = post
        self.config = config
        self.factory = factory
        self.client: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        """Create the client now (commands queue up) and start the process in the background."""
        self.client = self.factory(self.config)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(self.client,), daemon=True, name="engine-bridge")
        self._thread.start()

    def _run(self, client: Any) -> None:
        try:
            client.start()
        except Exception as exc:  # cannot even spawn: report like a crash
            self.post(WorkerLost(f"the worker could not be started: {exc}"))
            return
        while not self._stop.is_set() and client is self.client:
            try:
                event = client.next_event(timeout=0.2)
            except WorkerDied as exc:
                if not self._stop.is_set():
                    self.post(WorkerLost(str(exc)))
                return
            if event is not None:
                self.post(EngineEvent(event))

    def restart(self) -> None:
        old = self.client
        self.restarts += 1
        self.start()
        if old is not None:
            threading.Thread(target=old.close, kwargs={"timeout": 1.0}, daemon=True).start()

    def submit(self, job_id: str, workflow: dict[str, Any], previews: bool = True) -> None:
        self.client.submit(workflow, previews=previews, job_id=job_id)

    def cancel(self, job_id: str) -> None:
        self.client.cancel(job_id)

    def move_to_front(self, job_id: str) -> None:
        self.client.move_to_front(job_id)

    def close(self) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.close(timeout=2.0)

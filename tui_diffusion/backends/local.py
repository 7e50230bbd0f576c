"""The local backend: one worker process, spawned, fed commands, read for events. Torch-free.

The worker writes the jobs it accepts into the durable queue itself (``runtime.queue``), so a worker used
on its own (tests, the worker's own checks) is durable too; restarts are the supervisor's.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.runtime.protocol import Event, Unbatcher, WorkerDied
from tui_diffusion.runtime.queue import make_job
from tui_diffusion.settings import WorkerConfig


def describe_exit(code: int | None) -> str:
    """'killed by SIGKILL (the out-of-memory killer, or kill -9)', 'exit code 1', ..."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class WorkerClient:
    """One worker process (``pipeline.worker``), started with ``spawn``."""

    remote = False
    records_queue = True

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._ctx = mp.get_context("spawn")
        self.commands: Any = self._ctx.Queue()
        # events travel over a plain pipe: no feeder thread in the worker competing with sampling
        self._events, self._events_sender = self._ctx.Pipe(duplex=False)
        self.process: Any = None
        self.ready: m.WorkerReady | None = None
        self._batch = Unbatcher()  # the rest of a batch of events

    def start(self) -> None:
        from tui_diffusion.pipeline.worker import worker_main  # torch-free module; torch loads in the child

        self.process = self._ctx.Process(
            target=worker_main, args=(self.commands, self._events_sender, self.config), name="tui-diffusion-worker",
            daemon=True,
        )
        self.process.start()
        self._events_sender.close()  # the worker holds the only writing end: its death ends the pipe

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        """Block until the worker reports ready; raises WorkerDied if it fails to start."""
        while self.ready is None:
            event = self.next_event(timeout)
            if event is None:
                raise TimeoutError("the worker did not become ready in time")
            if isinstance(event, m.WorkerFailed):
                raise WorkerDied(event.message)
        return self.ready

    def submit(self, workflow: Workflow | dict[str, Any], previews: bool = False, job_id: str | None = None) -> str:
        job = make_job(workflow, previews, job_id)
        self.commands.put(job)
        return job.job_id

    def cancel(self, job_id: str) -> None:
        self.commands.put(m.CancelJob(job_id))

    def move_to_front(self, job_id: str) -> None:
        self.commands.put(m.MoveJob(job_id))

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds; WorkerDied if the process is gone."""
        if self._batch:
            return self._take(self._batch.pop())
        waited = 0.0
        step = 0.2 if timeout is None else min(0.2, timeout)
        while True:
            try:
                event = self._events.recv() if self._events.poll(step) else None
            except (EOFError, OSError):
                event = None
                if self.process is not None:
                    self.process.join(1.0)
            if event is None:
                if self.process is not None and not self.process.is_alive():
                    raise WorkerDied(f"the worker process ended ({describe_exit(self.process.exitcode)})") from None
                waited += step
                if timeout is not None and waited >= timeout:
                    return None
                continue
            return self._take(self._batch.take(event))

    def _take(self, event: Event) -> Event:
        if isinstance(event, m.WorkerReady):
            self.ready = event
        return event

    def close(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.commands.put(m.Shutdown())
            except (OSError, ValueError):
                pass  # the queue is closed: the process is being torn down anyway, terminate follows
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        self.process = None

    def __enter__(self) -> WorkerClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

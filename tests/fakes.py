"""A worker double for UI tests: a backend (``runtime.protocol.Backend``) that speaks the real message
protocol, driven by the test."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from PIL import Image

from tui_diffusion import messages as m
from tui_diffusion.runtime.protocol import WorkerDied


class FakeClient:
    instances: list[FakeClient] = []
    #: a double: the runtime writes no durable rows for it (the tests share one store, and rows of jobs a
    #: double never ran would be left over, held, in the next test)
    records_queue = False
    remote = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.ready: m.WorkerReady | None = None
        self.events: queue.Queue = queue.Queue()
        self.submitted: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.moved: list[str] = []
        self.dead: str | None = None
        self.closed = False
        FakeClient.instances.append(self)

    # -- the backend protocol ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.ready = m.WorkerReady("cpu", "Fake CPU", "float32", "0", "0", 1)
        self.events.put(self.ready)

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        assert self.ready is not None, "start() first"
        return self.ready

    def submit(self, workflow: dict[str, Any], previews: bool = False, job_id: str | None = None) -> str:
        assert job_id is not None
        self.submitted.append((job_id, workflow))
        self.events.put(m.JobAccepted(job_id, len(self.submitted)))
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def move_to_front(self, job_id: str) -> None:
        self.moved.append(job_id)

    def next_event(self, timeout: float | None = None) -> Any:
        if self.dead:
            raise WorkerDied(self.dead)
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True

    # -- driving it from a test ----------------------------------------------------------------------------
    def emit(self, *events: Any) -> None:
        for event in events:
            self.events.put(event)

    def run_job(self, job_id: str, out_dir: Path, steps: int = 4, finish: bool = True) -> Path:
        """Emit what the real worker emits for a job: start, nodes, progress with previews, finish."""
        out_dir.mkdir(parents=True, exist_ok=True)
        image = out_dir / f"{job_id}.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
        preview = out_dir / f"{job_id}-preview.png"
        Image.new("RGB", (8, 8), (30, 30, 200)).save(preview)
        self.emit(m.JobStarted(job_id), m.NodeCached(job_id, "4"), m.NodeStarted(job_id, "3"))
        for step in range(1, steps + 1):
            self.emit(m.Progress(job_id, "3", step, steps, preview.read_bytes()))
        if finish:
            self.finish(job_id, image)
        return image

    def finish(self, job_id: str, image: Path) -> None:
        self.emit(m.NodeFinished(job_id, "3", 0.5), m.NodeFinished(job_id, "8", 0.1),
                  m.NodeFinished(job_id, "9", 0.01),
                  m.JobFinished(job_id, [str(image)], ["3", "8", "9"], ["4", "5", "6", "7"],
                                {"3": 0.5, "8": 0.1, "9": 0.01}, 0.61))

    def crash(self, reason: str = "the worker process ended (exit code -9)") -> None:
        self.dead = reason

"""The queue as the TUI shows it: one record per job, updated from worker events. Torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.runtime.queue import (  # the queue's one vocabulary of states
    DONE,
    FAILED,
    FINAL,
    HELD,
    INTERRUPTED,
    PENDING,
    REMOVED,
    RUNNING,
    state_after,
)

__all__ = ["DONE", "FAILED", "FINAL", "HELD", "INTERRUPTED", "PENDING", "REMOVED", "RUNNING", "JobBook", "JobRecord"]


@dataclass
class JobRecord:
    job_id: str
    number: int
    workflow: dict[str, Any]
    label: str
    status: str = PENDING
    node_id: str | None = None
    step: int = 0
    total: int = 0
    step_started: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    started: float | None = None
    seconds: float | None = None
    outputs: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_node: str | None = None
    preview_png: bytes | None = None
    #: the worker or actor a pool gave it to (None with a single worker)
    worker: str | None = None

    @property
    def eta(self) -> float | None:
        """Seconds left in the sampler, from the mean step time so far."""
        if self.status != RUNNING or not self.step_seconds or not self.total:
            return None
        recent = self.step_seconds[-10:]
        return sum(recent) / len(recent) * max(self.total - self.step, 0)


class JobBook:
    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self._numbers = 0

    def add(self, job_id: str, workflow: dict[str, Any], label: str) -> JobRecord:
        self._numbers += 1
        record = JobRecord(job_id, self._numbers, workflow, label)
        self.jobs[job_id] = record
        return record

    def add_summary(self, job: m.JobSummary, label: str) -> JobRecord:
        """A job a background server already knows (queued by this or another client, maybe finished)."""
        record = self.jobs.get(job.job_id) or self.add(job.job_id, job.workflow, label)
        record.status, record.node_id, record.step, record.total = job.status, job.node_id, job.step, job.total
        record.outputs, record.error, record.error_node, record.seconds = (list(job.outputs), job.error,
                                                                           job.error_node, job.seconds)
        record.worker, record.executed, record.cached = job.worker, list(job.executed), list(job.cached)
        return record

    def held(self) -> list[JobRecord]:
        return [j for j in self.jobs.values() if j.status == HELD]

    def ordered(self) -> list[JobRecord]:
        return list(self.jobs.values())

    def pending(self) -> list[JobRecord]:
        return [j for j in self.jobs.values() if j.status == PENDING]

    def running(self) -> JobRecord | None:
        return next((j for j in self.jobs.values() if j.status == RUNNING), None)

    def move_to_front(self, job_id: str) -> None:
        record = self.jobs.pop(job_id)
        ahead = {k: v for k, v in self.jobs.items() if v.status != PENDING}
        behind = {k: v for k, v in self.jobs.items() if v.status == PENDING}
        self.jobs = {**ahead, job_id: record, **behind}

    def apply(self, event: Any, now: float | None = None) -> JobRecord | None:
        """Update the record an event belongs to; returns it (None for events of no known job)."""
        now = time.monotonic() if now is None else now
        job_id = getattr(event, "job_id", None)
        record = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if record is None:
            return None
        state = state_after(event)
        if state is not None:
            record.status = state
        if isinstance(event, m.JobPlaced):
            record.worker = event.worker
        elif isinstance(event, m.JobStarted):
            record.started = now
        elif isinstance(event, m.NodeStarted):
            record.node_id, record.step, record.total, record.step_started = event.node_id, 0, 0, now
        elif isinstance(event, m.Progress):
            if record.step_started is not None and event.step > record.step:
                record.step_seconds.append(now - record.step_started)
            record.node_id, record.step, record.total, record.step_started = event.node_id, event.step, event.total, now
            if event.preview_png:
                record.preview_png = event.preview_png
        elif isinstance(event, m.NodeFinished):
            record.timings[event.node_id] = event.seconds
            record.executed.append(event.node_id)
        elif isinstance(event, m.NodeCached):
            record.cached.append(event.node_id)
        elif isinstance(event, m.JobFinished):
            record.outputs, record.seconds, record.node_id = list(event.outputs), event.seconds, None
            if event.status == "ok":
                record.executed, record.cached, record.timings = list(event.executed), list(event.cached), dict(
                    event.timings)
        elif isinstance(event, m.JobFailed):
            record.error, record.error_node, record.node_id = event.message, event.node_id, None
        return record

    def worker_lost(self, reason: str) -> list[JobRecord]:
        """The worker died: the running job failed with ``reason``; returns the pending jobs to resubmit."""
        running = self.running()
        if running is not None:
            running.status, running.error, running.node_id = FAILED, reason, None
        return self.pending()

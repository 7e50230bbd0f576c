"""Several workers behind the calls of one. Torch-free.

The pool keeps the queue itself and gives each free worker one job at a time, choosing the worker that
already holds the job's checkpoint and the most of its cached graph (a new seed goes back where the
models are loaded), else any free one. Slots are local worker processes here (one per GPU, with
``CUDA_VISIBLE_DEVICES`` set for each, or N on the CPU) and Ray actors in ``ray_backend``; the dispatch
is the same.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Any, Protocol

from tui_diffusion import messages as m
from tui_diffusion.runtime.protocol import Event, WorkerDied
from tui_diffusion.runtime.queue import make_job
from tui_diffusion.settings import WorkerConfig


class Slot(Protocol):
    """One place a job can run: a worker process, a Ray actor."""

    name: str
    alive: bool

    def start(self) -> None: ...

    def submit(self, job: m.SubmitJob) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def next_event(self, timeout: float) -> Event | None: ...

    def close(self) -> None: ...


class LocalSlot:
    """A supervised worker process (restarted if it dies, by the runtime's one policy), on one GPU or on the
    CPU."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        from tui_diffusion.runtime.supervisor import Supervisor

        self.name = name
        self.alive = True
        self.supervisor = Supervisor(config, record=False)  # the pool's own supervisor writes the rows

    @property
    def process(self) -> Any:
        return self.supervisor.process

    def start(self) -> None:
        self.supervisor.start()

    def submit(self, job: m.SubmitJob) -> None:
        self.supervisor.submit(job.workflow, previews=job.previews, job_id=job.job_id)

    def cancel(self, job_id: str) -> None:
        self.supervisor.cancel(job_id)

    def next_event(self, timeout: float) -> Event | None:
        try:
            return self.supervisor.next_event(timeout)
        except WorkerDied as exc:
            self.alive = False
            return m.WorkerFailed(f"{self.name}: {exc}")

    def close(self) -> None:
        self.supervisor.close(timeout=5.0)


def checkpoints_of(workflow: dict[str, Any]) -> set[str]:
    return {str(node.get("inputs", {}).get("ckpt_name")) for node in workflow.values()
            if isinstance(node, dict) and "ckpt_name" in node.get("inputs", {})}


def shared_nodes(a: dict[str, Any] | None, b: dict[str, Any]) -> int:
    """Nodes two workflows have in common (same id, class and inputs): what a worker's cache can reuse."""
    if not a:
        return 0
    return sum(1 for node_id, node in b.items() if a.get(node_id) == node)


class Pool:
    """The pool's queue and dispatch, behind the backend protocol (``runtime.protocol.Backend``). It only
    executes: the durable rows and the restart policy are the runtime's supervisor's."""

    remote = False
    records_queue = True

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.pending: collections.OrderedDict[str, m.SubmitJob] = collections.OrderedDict()
        self.busy: dict[int, str] = {}
        self.last: dict[int, dict[str, Any]] = {}
        self.loaded: dict[int, set[str]] = {i: set() for i in range(len(slots))}
        self.readies: dict[int, m.WorkerReady] = {}
        self.ready: m.WorkerReady | None = None
        self.placed: dict[str, str] = {}
        self._inbox: queue.Queue[tuple[int, Event | None]] = queue.Queue()
        self._out: collections.deque[Event] = collections.deque()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []

    @property
    def process(self) -> Any:
        return getattr(self.slots[0], "process", None) if self.slots else None

    # -- life -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for index, slot in enumerate(self.slots):
            slot.start()
            pump = threading.Thread(target=self._pump, args=(index, slot), daemon=True, name=f"pool-{index}")
            pump.start()
            self._pumps.append(pump)

    def _pump(self, index: int, slot: Slot) -> None:
        while not self._stop.is_set() and slot.alive:
            event = slot.next_event(0.2)
            if event is not None:
                self._inbox.put((index, event))
        self._inbox.put((index, None))  # the slot is gone for good

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        deadline = None if timeout is None else time.monotonic() + timeout
        early: list[Event] = []
        while self.ready is None:
            event = self.next_event(0.2)
            if isinstance(event, m.WorkerFailed) and not any(s.alive for s in self.slots):
                raise WorkerDied(event.message)
            if event is not None and not isinstance(event, m.WorkerReady):
                early.append(event)
            if deadline is not None and time.monotonic() >= deadline and self.ready is None:
                raise TimeoutError("the workers did not become ready in time")
        self._out.extendleft(reversed(early))
        return self.ready

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for pump in self._pumps:  # each is at most one short read away from seeing the stop
            pump.join(1.0)
        threads = [threading.Thread(target=slot.close, daemon=True) for slot in self.slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)

    # -- commands ---------------------------------------------------------------------------------------------
    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str:
        job = make_job(workflow, previews, job_id)
        with self._lock:
            self.pending[job.job_id] = job
            self._out.append(m.JobAccepted(job.job_id, len(self.pending)))
            self._dispatch()
        return job.job_id

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self.pending.pop(job_id, None) is not None:
                self._out.append(m.JobRemoved(job_id))  # the supervisor records it as removed
                return
            for index, running in self.busy.items():
                if running == job_id:
                    self.slots[index].cancel(job_id)

    def move_to_front(self, job_id: str) -> None:
        with self._lock:
            if job_id in self.pending:
                self.pending.move_to_end(job_id, last=False)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def score(self, index: int, job: m.SubmitJob) -> int:
        """Higher for the worker that can reuse more: its checkpoints first, then its cached nodes."""
        held = len(checkpoints_of(job.workflow) & self.loaded[index])
        return 1000 * held + shared_nodes(self.last.get(index), job.workflow)

    def _dispatch(self) -> None:
        while self.pending:
            free = [i for i, slot in enumerate(self.slots) if slot.alive and i not in self.busy]
            if not free:
                return
            job_id, job = next(iter(self.pending.items()))
            index = max(free, key=lambda i: (self.score(i, job), -i))
            del self.pending[job_id]
            self.busy[index] = job_id
            self.placed[job_id] = self.slots[index].name
            self._out.append(m.JobPlaced(job_id, self.slots[index].name))
            self.slots[index].submit(job)
            self.last[index] = job.workflow
            self.loaded[index] |= checkpoints_of(job.workflow)

    def _absorb(self, index: int, event: Event | None) -> Event | None:
        """Update the pool from one slot's event; returns what the caller should see (or None)."""
        if event is None:  # the slot ended (a lost actor that could not be replaced)
            self.slots[index].alive = False
            running = self.busy.pop(index, None)
            events: list[Event] = []
            if running is not None:
                events.append(m.JobFailed(running, None, f"{self.slots[index].name} was lost"))
            if not any(s.alive for s in self.slots):
                for job_id in list(self.pending):
                    del self.pending[job_id]
                    events.append(m.JobFailed(job_id, None, "no worker is left to run it"))
            self._out.extend(events)
            return None
        if isinstance(event, m.WorkerReady):
            self.readies[index] = event
            return self._all_ready()
        if isinstance(event, m.JobAccepted):
            return None  # the pool acknowledged it when it was submitted
        if isinstance(event, m.WorkerFailed):
            self.slots[index].alive = False
            if any(s.alive for s in self.slots):  # the others carry on: a notice, not the end
                ready = self._all_ready()
                if ready is not None:
                    self._out.append(ready)
                return m.Notice(f"{event.message}; the other workers carry on")
            return event
        if isinstance(event, m.WorkerRestarted):
            self.loaded[index] = set()
            self.last.pop(index, None)
            return dataclasses.replace(event, reason=f"{self.slots[index].name}: {event.reason}")
        if isinstance(event, m.JobEnd) and self.busy.get(index) == event.job_id:
            del self.busy[index]
            if isinstance(event, m.JobFailed):
                self.last.pop(index, None)
        return event

    def _all_ready(self) -> m.WorkerReady | None:
        """One ready event for the pool, once every worker still alive is ready."""
        alive = [i for i, slot in enumerate(self.slots) if slot.alive]
        if self.ready is not None or not alive or any(i not in self.readies for i in alive):
            return None
        names = [self.readies[i].device_name for i in alive]
        self.ready = dataclasses.replace(self.readies[alive[0]],
                                         device_name=f"{len(names)} workers: {', '.join(names)}")
        return self.ready

    def next_event(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._out:
                    return self._out.popleft()
            wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            try:
                index, event = self._inbox.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            with self._lock:
                shown = self._absorb(index, event)
                self._dispatch()
                if shown is not None:
                    self._out.append(shown)


def parse_gpus(spec: str, available: int | None = None) -> list[str]:
    """``all`` or ``0,1,3`` -> the device indices, one worker each."""
    if spec.strip().lower() == "all":
        if not available:
            raise ValueError("--gpus all: no GPU is visible here (use --workers N for CPU workers)")
        return [str(i) for i in range(available)]
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ValueError(f"--gpus {spec!r}: give 'all' or GPU indices such as 0,1")
    return ids


def local_pool(config: WorkerConfig, workers: int = 0, gpus: list[str] | None = None) -> Pool:
    """One worker per listed GPU (each sees only its own), or ``workers`` CPU workers."""
    from tui_diffusion.settings import DevicePolicy

    slots: list[Slot] = []
    if gpus:
        for gpu in gpus:
            one = dataclasses.replace(config, visible_devices=gpu,
                                      device=dataclasses.replace(config.device, device="cuda:0"))
            slots.append(LocalSlot(one, f"worker {len(slots)} (GPU {gpu})"))
    else:
        cpu = dataclasses.replace(config, device=DevicePolicy("cpu", memory=config.device.memory,
                                                              precision=config.device.precision,
                                                              vae_precision=config.device.vae_precision),
                                  torch_threads=max(1, _cpus() // max(workers, 1)))
        for _ in range(max(workers, 1)):
            slots.append(LocalSlot(cpu, f"worker {len(slots)} (CPU)"))
    return Pool(slots)


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def count_gpus() -> int:
    """GPUs the driver reports, without importing torch (nvidia-smi), 0 if none can be seen."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))

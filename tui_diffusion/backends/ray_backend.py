"""The Ray backend: one actor per GPU of a Ray cluster (or N CPU actors), each wrapping the same worker
engine as a local worker process, behind the pool's queue and cache-aware dispatch. Torch-free on the
client side; needs the optional ``ray`` extra (``pip install tui-diffusion[ray]``).

Events travel back through a Ray queue per actor (an actor of Ray's own); interrupting runs on a second
thread of the actor while the job runs. Images are written by the actor; when the client cannot read
them where the actor wrote them (another machine), their bytes are fetched from the actor and written
into the client's output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.backends.pool import Pool, Slot
from tui_diffusion.runtime.protocol import Event, Unbatcher
from tui_diffusion.settings import WorkerConfig

log = logging.getLogger("tui_diffusion.ray")


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the Ray backend needs Ray: pip install 'tui-diffusion[ray]'") from None
    return ray


class EngineActor:
    """Runs in a Ray worker process: the engine of a local worker, fed one job at a time."""

    def __init__(self, config: WorkerConfig, events: Any) -> None:
        from tui_diffusion.pipeline.worker import WorkerEngine, _Events

        class _Sink:
            def send(self, event: Any) -> None:
                events.put(event)

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.events = _Events(_Sink())
        self.engine = WorkerEngine(config, self.events.put)
        self.interrupt = threading.Event()

    def ready(self) -> m.WorkerReady:
        import socket

        ready = self.engine.ready
        return dataclasses.replace(ready, device_name=f"{ready.device_name} on {socket.gethostname()}")

    def run(self, job: m.SubmitJob) -> Any:
        self.interrupt.clear()
        self.engine.queue.queued(job)
        return self.engine.run(job, self.interrupt.is_set)

    def cancel(self) -> None:
        self.interrupt.set()

    def read_file(self, path: str) -> bytes:
        """An output the client cannot reach on its own filesystem (only files under the output folder)."""
        target = Path(path).resolve()
        if not target.is_relative_to(Path(self.engine.engine.output_dir).resolve()):
            raise PermissionError(f"{path} is not an output")
        return target.read_bytes()


class RaySlot:
    """One actor and its event queue, as the pool's slot."""

    def __init__(self, ray: Any, actor_cls: Any, config: WorkerConfig, name: str, gpus: float) -> None:
        from ray.util.queue import Queue

        self.ray = ray
        self.name = name
        self.alive = True
        self.config = config
        self.events = Queue(actor_options={"num_cpus": 0})
        self.actor = actor_cls.options(num_gpus=gpus, num_cpus=0 if gpus else 1,
                                       max_concurrency=2).remote(config, self.events)
        self.running: tuple[str, Any] | None = None
        self._lock = threading.Lock()
        self._batch = Unbatcher()  # the rest of a batch of events

    def start(self) -> None:
        ref = self.actor.ready.remote()

        def announce() -> None:
            try:
                self.events.put(self.ray.get(ref))
            except Exception as exc:
                self.events.put(m.WorkerFailed(f"{self.name} could not start: {exc}"))
                self.alive = False

        threading.Thread(target=announce, daemon=True).start()

    def submit(self, job: m.SubmitJob) -> None:
        with self._lock:
            self.running = (job.job_id, self.actor.run.remote(job))

    def cancel(self, job_id: str) -> None:
        if self.running and self.running[0] == job_id:
            self.actor.cancel.remote()

    def _lost(self) -> Any:
        """The running job's end, if its actor died under it."""
        with self._lock:
            if self.running is None:
                return None
            job_id, ref = self.running
            done, _ = self.ray.wait([ref], timeout=0)
            if not done:
                return None
            self.running = None
        try:
            self.ray.get(ref)
            return None  # it ended normally: its end event comes through the queue
        except Exception as exc:  # RayActorError, a lost node, ...
            self.alive = False
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return m.JobFailed(job_id, None, f"{self.name} was lost while running it: {reason}")

    def next_event(self, timeout: float) -> Event | None:
        if self._batch:
            return self._batch.pop()
        try:
            received = self.events.get(timeout=timeout)
        except queue.Empty:
            return self._lost()
        except BaseException as exc:  # the queue's actor is gone with the cluster (Ray raises SystemExit on shutdown)
            log.info("%s: its event queue is gone (%s); the slot ends", self.name, type(exc).__name__)
            self.alive = False
            return None
        event = self._batch.take(received)  # a batch from the engine's event throttle
        if isinstance(event, m.JobFinished) and event.outputs:
            event = self._fetch_outputs(event)
        return event

    def _fetch_outputs(self, event: m.JobFinished) -> m.JobFinished:
        """Bring the images to this machine when the actor wrote them somewhere the client cannot read."""
        if all(Path(p).is_file() for p in event.outputs):
            return event
        from tui_diffusion.store.outputs import store_bytes

        local = []
        for path in event.outputs:
            data = self.ray.get(self.actor.read_file.remote(path))
            local.append(str(store_bytes(Path(self.config.output_dir), Path(path).name, data)))
        return dataclasses.replace(event, outputs=local)

    def close(self) -> None:
        try:
            self.ray.kill(self.actor)
        except Exception as exc:  # dead already, or the cluster is gone: nothing left to stop
            log.info("%s: could not kill its actor (%s)", self.name, exc)


def connect(address: str, cpus: int) -> Any:
    """``local``: a throwaway single-machine cluster on loopback; ``auto``: the cluster this machine is in;
    ``ray://host:port``: a remote cluster through Ray Client."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "namespace": "tui-diffusion",
                              "ignore_reinit_error": True}
    if address == "local":
        kwargs.update(address="local", num_cpus=max(cpus, 1) + 1, _node_ip_address="127.0.0.1",
                      object_store_memory=100 * 2**20)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return ray


def ray_pool(config: WorkerConfig, address: str = "local", actors: int = 0) -> Pool:
    """One actor per GPU in the cluster (or ``actors`` of them), else ``actors`` (default 2) CPU actors."""
    ray = connect(address, max(actors, 2))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or gpus or 2
    actor_cls = ray.remote(EngineActor)
    slots: list[Slot] = []
    for index in range(count):
        if gpus:
            one = dataclasses.replace(config, device=dataclasses.replace(config.device, device="cuda:0"))
        else:
            from tui_diffusion.settings import DevicePolicy

            one = dataclasses.replace(config, device=DevicePolicy("cpu"), torch_threads=1)
        kind = "GPU" if gpus else "CPU"
        slots.append(RaySlot(ray, actor_cls, one, f"actor {index} ({kind})", 1 if gpus else 0))
    return Pool(slots)

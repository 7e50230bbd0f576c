"""The worker process: the only process that imports torch.

Started with the ``spawn`` context; it reads commands from one multiprocessing queue and writes
events to another (``tui_diffusion.messages``), nothing else. A reader thread takes commands
while a job runs, so a job can be interrupted (checked every sampling step) or a pending one
removed. This module is importable without torch: torch is imported inside ``worker_main``.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.settings import WorkerConfig

log = logging.getLogger("tui_diffusion.worker")


class _Jobs:
    """Pending jobs and the interrupt flag of the running one, shared with the reader thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: deque[m.SubmitJob] = deque()
        self.running: str | None = None
        self.interrupt = threading.Event()
        self.stop = False


def _reader(cmd_q: Any, evt_q: Any, jobs: _Jobs) -> None:
    import multiprocessing

    parent = multiprocessing.parent_process()
    while True:
        try:
            cmd = cmd_q.get(timeout=0.5)
        except Exception:  # queue.Empty, or the pipe closed under us
            if parent is not None and not parent.is_alive():
                cmd = m.Shutdown()
            else:
                continue
        with jobs.cond:
            if isinstance(cmd, m.SubmitJob):
                jobs.pending.append(cmd)
                evt_q.put(m.JobAccepted(cmd.job_id, len(jobs.pending)))
            elif isinstance(cmd, m.CancelJob):
                if jobs.running == cmd.job_id:
                    jobs.interrupt.set()
                else:
                    for job in list(jobs.pending):
                        if job.job_id == cmd.job_id:
                            jobs.pending.remove(job)
                            evt_q.put(m.JobRemoved(job.job_id))
            elif isinstance(cmd, m.MoveJob):
                for job in list(jobs.pending):
                    if job.job_id == cmd.job_id:
                        jobs.pending.remove(job)
                        jobs.pending.appendleft(job)
                        evt_q.put(m.JobMoved(job.job_id, 1))
            elif isinstance(cmd, m.Shutdown):
                jobs.stop = True
                jobs.interrupt.set()
                jobs.cond.notify_all()
                return
            jobs.cond.notify_all()


def _isolate_output(temp_dir: str, file_only: bool) -> None:
    """Keep library prints off the client's stdout (``run --json`` owns it), and off the terminal
    altogether when the TUI draws on it; log to a file."""
    os.makedirs(temp_dir, exist_ok=True)
    log_path = os.path.join(temp_dir, "worker.log")
    if file_only:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _png(rgb: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _open_history(engine: Any, config: WorkerConfig) -> str | None:
    """Attach the run history to the engine; a history that cannot be opened never stops the worker."""
    if not config.record_history:
        return None
    from tui_diffusion.store.history import History, StoreError

    try:
        engine.history = History(config.db_path)
        return engine.history.notice
    except (StoreError, OSError, Exception) as exc:  # sqlite3 errors included
        log.error("run history unavailable: %s", exc)
        return f"run history is not recorded: {exc}"


def workflow_changes(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """What a job changed relative to the previous one: ``{"3.seed": [old, new], "+10": "LoraLoader"}``."""
    if before is None:
        return {}
    changes: dict[str, Any] = {}
    for node_id in sorted(set(before) | set(after)):
        if node_id not in before:
            changes[f"+{node_id}"] = after[node_id].get("class_type")
        elif node_id not in after:
            changes[f"-{node_id}"] = before[node_id].get("class_type")
        else:
            old, new = before[node_id].get("inputs", {}), after[node_id].get("inputs", {})
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    changes[f"{node_id}.{name}"] = [old.get(name), new.get(name)]
    return changes


class _Recorder:
    """Writes the run history on a thread of its own, so no job waits for the database or for hashing
    its files; a failure to write is logged, never fatal to a job."""

    def __init__(self, history: Any, device: str, hasher: Any = None) -> None:
        import queue

        self.history = history
        self.device = device
        self.hasher = hasher
        self.previous: dict[str, Any] | None = None
        self.tasks: queue.Queue = queue.Queue()
        #: set while no job runs: recording waits for it, so it never competes with a job for the CPU
        self.idle = threading.Event()
        self.idle.set()
        if history is not None:
            threading.Thread(target=self._drain, daemon=True, name="history").start()

    def _drain(self) -> None:
        while True:
            task = self.tasks.get()
            self.idle.wait(timeout=30)  # a long queue of jobs still gets recorded now and then
            try:
                task()
            except Exception:
                log.exception("could not record a job in the history")
            finally:
                self.tasks.task_done()

    def flush(self) -> None:
        if self.history is not None:
            self.tasks.join()

    def started(self, job: m.SubmitJob) -> None:
        if self.history is not None:
            previous, self.previous = self.previous, job.workflow
            self.tasks.put(lambda: self._started(job, previous))

    def finished(self, job: m.SubmitJob, status: str, **fields: Any) -> None:
        if self.history is not None:
            self.tasks.put(lambda: self._finished(job, status, **fields))

    def _started(self, job: m.SubmitJob, previous: dict[str, Any] | None) -> None:
        from tui_diffusion.graph.a1111 import summary

        outputs = [n for n, node in job.workflow.items() if node.get("class_type") in ("SaveImage", "PreviewImage")]
        info = summary(job.workflow, outputs[0]) if outputs else None
        prompt = f"{info['prompt']}\n{info['negative']}" if info else ""
        self.history.job_started(job.job_id, job.workflow, workflow_changes(previous, job.workflow), prompt,
                                 self.device)

    def _finished(self, job: m.SubmitJob, status: str, **fields: Any) -> None:
        models = {}
        for node in job.workflow.values():
            name = node.get("inputs", {}).get("ckpt_name")
            if node.get("class_type") == "CheckpointLoaderSimple" and isinstance(name, str) and status == "ok":
                models[name] = (self.hasher("checkpoints", name) if self.hasher else None) or ""
        self.history.job_finished(job.job_id, status, models=models, **fields)


class _Events:
    """The worker's end of the event pipe; the job loop and the command reader both send on it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def put(self, event: Any) -> None:
        with self.lock:
            try:
                self.conn.send(event)
            except (BrokenPipeError, OSError):
                pass  # the client is gone; the command reader notices and shuts the worker down


def worker_main(cmd_q: Any, evt_conn: Any, config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    evt_q = _Events(evt_conn)
    _isolate_output(str(config.temp_dir), config.log_to_file_only)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers
        import platformdirs
        import torch

        from tui_diffusion.paths import ModelPaths
        from tui_diffusion.pipeline.context import EngineState
        from tui_diffusion.pipeline.device import resolve_device
        from tui_diffusion.pipeline.errors import Interrupted
        from tui_diffusion.pipeline.executor import Executor, Hooks, JobError
        from tui_diffusion.pipeline.models import ModelCache

        device = resolve_device(config.device)
        engine = EngineState(
            device=device,
            models=ModelCache(config.max_checkpoints),
            paths=ModelPaths(config.models_dir, config.input_dir, tuple(config.extra_model_paths)),
            output_dir=config.output_dir,
            temp_dir=config.temp_dir,
            config_cache=platformdirs.user_cache_path("tui-diffusion") / "configs",
        )
        executor = Executor(engine)
        notice = _open_history(engine, config)
    except Exception as exc:  # a broken install: tell the client instead of dying silently
        log.exception("worker start failed")
        evt_q.put(m.WorkerFailed(f"the worker could not start: {type(exc).__name__}: {exc}"))
        return

    jobs = _Jobs()
    threading.Thread(target=_reader, args=(cmd_q, evt_q, jobs), daemon=True, name="commands").start()
    evt_q.put(m.WorkerReady(str(device.torch_device), device.name, str(device.dtype).replace("torch.", ""),
                            torch.__version__, diffusers.__version__, os.getpid(), notice))
    recorder = _Recorder(engine.history, f"{device.torch_device} ({device.name})", engine.model_hash)

    class _Hooks(Hooks):
        def __init__(self, job: m.SubmitJob) -> None:
            self.job = job
            self.last_preview = 0.0

        def node_started(self, node_id: str) -> None:
            evt_q.put(m.NodeStarted(self.job.job_id, node_id))

        def node_cached(self, node_id: str) -> None:
            evt_q.put(m.NodeCached(self.job.job_id, node_id))

        def node_finished(self, node_id: str, seconds: float) -> None:
            evt_q.put(m.NodeFinished(self.job.job_id, node_id, seconds))

        def progress(self, node_id: str, step: int, total: int, preview: Any) -> None:
            png = None
            now = time.monotonic()
            if preview is not None and (now - self.last_preview > 0.25 or step == total):
                png, self.last_preview = _png(preview), now
            evt_q.put(m.Progress(self.job.job_id, node_id, step, total, png))

    while True:
        with jobs.cond:
            while not jobs.pending and not jobs.stop:
                jobs.cond.wait()
            if jobs.stop:
                recorder.flush()  # what was recorded reaches the database before the worker ends
                break
            job = jobs.pending.popleft()
            jobs.running = job.job_id
            jobs.interrupt.clear()
        evt_q.put(m.JobStarted(job.job_id))
        recorder.idle.clear()
        recorder.started(job)
        start = time.perf_counter()
        try:
            report = executor.run(job.workflow, _Hooks(job), jobs.interrupt.is_set, previews=job.previews)
            seconds = time.perf_counter() - start
            recorder.finished(job, "ok", outputs=report.outputs, timings=report.timings, seconds=seconds)
            evt_q.put(m.JobFinished(job.job_id, report.outputs, report.executed, report.cached, report.timings,
                                    seconds))
        except Interrupted:
            recorder.finished(job, "interrupted", seconds=time.perf_counter() - start)
            evt_q.put(m.JobFinished(job.job_id, [], [], [], {}, time.perf_counter() - start, status="interrupted"))
        except JobError as exc:
            recorder.finished(job, "error", error=exc.message, error_node=exc.node_id)
            evt_q.put(m.JobFailed(job.job_id, exc.node_id, exc.message))
        except Exception as exc:  # never let one job take the worker down
            log.error("job %s failed:\n%s", job.job_id, traceback.format_exc())
            message = f"internal error: {type(exc).__name__}: {exc}"
            recorder.finished(job, "error", error=message)
            evt_q.put(m.JobFailed(job.job_id, None, message))
        finally:
            with jobs.cond:
                jobs.running = None
                if not jobs.pending:
                    recorder.idle.set()
            if device.torch_device.type == "cuda":
                torch.cuda.empty_cache()

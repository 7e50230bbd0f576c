"""The worker process: the only process that imports torch.

Started with the ``spawn`` context; it reads commands from a multiprocessing queue and writes events
(``tui_diffusion.messages``) to a pipe, nothing else; the jobs it accepts and their states go to the
durable queue (``runtime.queue``). A reader thread takes commands
while a job runs, so a job can be interrupted (checked every sampling step) or a pending one
removed. This module is importable without torch: torch is imported inside ``worker_main``.
"""

from __future__ import annotations

import io
import logging
import os
import queue as queue_module
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.runtime.queue import (
    DONE,
    FAILED,
    INTERRUPTED,
    REMOVED,
    RUNNING,
    DurableQueue,
    join_queue,
    to_store,
)
from tui_diffusion.settings import WorkerConfig

log = logging.getLogger("tui_diffusion.worker")


#: how long a worker told to stop (its client gone, SIGTERM) may take to end cleanly before it exits anyway:
#: its jobs are in the durable store already, so nothing is lost by not waiting longer
STOP_GRACE = 1.0


class _Jobs:
    """Pending jobs and the interrupt flag of the running one, shared with the reader thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: deque[m.SubmitJob] = deque()
        self.running: str | None = None
        self.interrupt = threading.Event()
        self.stop = False
        #: set once the job loop has ended (and written what it could)
        self.ended = threading.Event()
        #: the signal that stopped the worker: it ends by that signal, so its client reports the cause
        self.signal: int | None = None

    def request_stop(self, reason: str, grace: float | None = None) -> None:
        """End the worker: interrupt the running job (left "running" in the store, so ``resume`` offers it),
        keep the pending ones in the store; with ``grace``, exit the process after that many seconds whatever
        the job loop is doing (a node that does not check the interrupt flag, a stuck write)."""
        with self.cond:
            if not self.stop:
                log.info("stopping: %s", reason)
            self.stop = True
            self.interrupt.set()
            self.cond.notify_all()
        if grace is not None:
            threading.Thread(target=self._exit_after, args=(grace,), daemon=True, name="stop-deadline").start()

    def _exit_after(self, grace: float) -> None:
        if not self.ended.wait(grace):
            log.warning("the job loop did not end within %.1f s; exiting now", grace)
            self.exit(1)

    def exit(self, code: int) -> None:
        """End the process now, without the interpreter's teardown (seconds with torch loaded)."""
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if self.signal is not None:
            if threading.current_thread() is threading.main_thread():  # only there can the handler be reset
                signal.signal(self.signal, signal.SIG_DFL)
                os.kill(os.getpid(), self.signal)
                time.sleep(1)
            code = 128 + self.signal  # as a shell reports a process ended by that signal
        os._exit(code)


def _watch_parent(jobs: _Jobs) -> None:
    """The client (or server) that started this worker died, however it died: stop at once. Waits on the
    parent's sentinel, so it notices within milliseconds, not at the next command."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent.join()  # returns when the parent's end of the pipe closes: its death
    jobs.request_stop("the client that started this worker is gone", grace=STOP_GRACE)


def _obey_sigterm(jobs: _Jobs) -> None:
    """SIGTERM stops the worker as a lost client does. The signal is read from a wake-up pipe by a thread of
    its own, so it acts even while the main thread is inside a long native call (a model load, a decode)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the handler's C half writes the signal number to ``w``
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def wait() -> None:
        while True:
            data = os.read(r, 64)
            if not data:
                return
            if signal.SIGTERM in data:
                jobs.signal = signal.SIGTERM
                jobs.request_stop("SIGTERM", grace=STOP_GRACE)

    threading.Thread(target=wait, daemon=True, name="sigterm").start()


def _reader(cmd_q: Any, evt_q: Any, jobs: _Jobs, queue: DurableQueue) -> None:
    while True:
        try:
            cmd = cmd_q.get(timeout=0.5)
        except (EOFError, OSError):  # the pipe closed under us: the client is gone
            jobs.request_stop("the command pipe closed", grace=STOP_GRACE)
            return
        except queue_module.Empty:
            continue
        except Exception:  # a command that does not unpickle: skipped, the client's next one may be fine
            log.exception("a command from the client could not be read; it is skipped")
            continue
        with jobs.cond:
            if isinstance(cmd, m.SubmitJob):
                queue.queued(cmd)  # in the store before it is acknowledged: a crash from here on loses nothing
                jobs.pending.append(cmd)
                evt_q.put(m.JobAccepted(cmd.job_id, len(jobs.pending)))
            elif isinstance(cmd, m.CancelJob):
                if jobs.running == cmd.job_id:
                    jobs.interrupt.set()
                else:
                    for job in list(jobs.pending):
                        if job.job_id == cmd.job_id:
                            jobs.pending.remove(job)
                            queue.state(job.job_id, REMOVED)
                            evt_q.put(m.JobRemoved(job.job_id))
            elif isinstance(cmd, m.MoveJob):
                for job in list(jobs.pending):  # the client reordered its own view already: no event
                    if job.job_id == cmd.job_id:
                        jobs.pending.remove(job)
                        jobs.pending.appendleft(job)
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

    def flush(self, timeout: float | None = None) -> bool:
        """Write what is queued now, without waiting for the worker to be idle; False if ``timeout`` passed."""
        self.idle.set()
        return self.history is None or join_queue(self.tasks, timeout)

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
        done = status == to_store(DONE)
        for node in job.workflow.values():
            name = node.get("inputs", {}).get("ckpt_name")
            if node.get("class_type") == "CheckpointLoaderSimple" and isinstance(name, str) and done:
                models[name] = (self.hasher("checkpoints", name) if self.hasher else None) or ""
        self.history.job_finished(job.job_id, status, models=models, **fields)


#: Events that only report how far a job got: held back briefly and sent with the next one, so a short job
#: crosses the process boundary in one message instead of a dozen (each wakes the client, which competes
#: with sampling for the CPU). Anything a user waits on (an end, a preview, a removal) goes at once.
_HOLD = (m.JobAccepted, m.JobStarted, m.NodeStarted, m.NodeCached, m.NodeFinished, m.Progress)


class _Events:
    """The worker's end of the event pipe; the job loop and the command reader both send on it.

    Progress-only events go at once when nothing went in the last ``latency`` seconds, else they wait, at
    most ``latency`` seconds, for the next event or for the flusher thread: at most one message per
    ``latency`` reaches the client however fast the steps are, and a 30 ms job is two messages."""

    def __init__(self, conn: Any, latency: float = 0.05) -> None:
        self.conn = conn
        self.latency = latency
        self.lock = threading.Lock()
        self.held: list[Any] = []
        self.sent_at = 0.0
        self.wake = threading.Event()
        threading.Thread(target=self._flusher, daemon=True, name="events").start()

    def put(self, event: Any) -> None:
        with self.lock:
            self.held.append(event)
            hold = isinstance(event, _HOLD) and not getattr(event, "preview_png", None)
            if hold and (len(self.held) > 1 or time.monotonic() - self.sent_at < self.latency):
                self.wake.set()  # the flusher sends it within latency if nothing else does first
                return
            self._send()

    def _send(self) -> None:
        events, self.held = self.held, []
        if not events:
            return
        self.sent_at = time.monotonic()
        try:
            self.conn.send(events[0] if len(events) == 1 else events)
        except (BrokenPipeError, OSError):
            pass  # the client is gone; the command reader notices and shuts the worker down

    def _flusher(self) -> None:
        while True:
            self.wake.wait()
            time.sleep(self.latency)
            with self.lock:
                self.wake.clear()
                self._send()


def worker_main(cmd_q: Any, evt_conn: Any, config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    if hasattr(signal, "SIGHUP"):
        # A terminal that goes away is the client's to handle too: off the terminal's session, the worker
        # ends only when its client does (and then cleanly, its queue left in the store).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            os.setsid()
        except OSError:
            pass
    if config.visible_devices is not None:  # before torch sees CUDA: this worker's GPU only
        os.environ["CUDA_VISIBLE_DEVICES"] = config.visible_devices
    evt_q = _Events(evt_conn)
    _isolate_output(str(config.temp_dir), config.log_to_file_only)
    jobs = _Jobs()
    # from here on a lost client or a SIGTERM ends the worker within STOP_GRACE, even while torch loads
    threading.Thread(target=_watch_parent, args=(jobs,), daemon=True, name="parent").start()
    _obey_sigterm(jobs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        engine = WorkerEngine(config, evt_q.put)
    except Exception as exc:  # a broken install: tell the client instead of dying silently
        log.exception("worker start failed")
        evt_q.put(m.WorkerFailed(f"the worker could not start: {type(exc).__name__}: {exc}"))
        jobs.ended.set()
        return

    threading.Thread(target=_reader, args=(cmd_q, evt_q, jobs, engine.queue), daemon=True, name="commands").start()
    evt_q.put(engine.ready)
    try:
        with jobs.cond:
            idle = not jobs.pending and not jobs.stop
        if config.preload and idle:  # a job already waiting loads what it needs itself
            engine.preload(config.preload)
        while True:
            with jobs.cond:
                while not jobs.pending and not jobs.stop:
                    jobs.cond.wait()
                if jobs.stop:
                    break
                job = jobs.pending.popleft()
                jobs.running = job.job_id
                jobs.interrupt.clear()
            try:
                engine.run(job, jobs.interrupt.is_set, stopping=lambda: jobs.stop)
            finally:
                with jobs.cond:
                    jobs.running = None
                    if not jobs.pending:
                        engine.recorder.idle.set()
    finally:
        engine.close(timeout=3.0)  # what was recorded reaches the database before the worker ends
        jobs.ended.set()
        log.info("the worker ends")
    jobs.exit(0)  # everything is written; a client (or a GPU) waits on this process's end


class WorkerEngine:
    """What a worker runs, one job at a time: the device, the cached executor, the run history and the
    queue store, reporting through ``emit``. The local worker process and a Ray actor both wrap it, so a
    job behaves the same wherever it runs."""

    def __init__(self, config: WorkerConfig, emit: Any) -> None:
        import diffusers
        import platformdirs
        import torch

        from tui_diffusion.paths import ModelPaths
        from tui_diffusion.pipeline.context import EngineState
        from tui_diffusion.pipeline.device import resolve_device
        from tui_diffusion.pipeline.executor import Executor
        from tui_diffusion.pipeline.models import ModelCache

        self.emit = emit
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = device = resolve_device(config.device)
        self.engine = EngineState(
            device=device,
            models=ModelCache(config.max_checkpoints),
            paths=ModelPaths(config.models_dir, config.input_dir, tuple(config.extra_model_paths)),
            output_dir=config.output_dir,
            temp_dir=config.temp_dir,
            config_cache=platformdirs.user_cache_path("tui-diffusion") / "configs",
            allow_pickle=config.allow_pickle,
            limits=config.limits,
            preview_method=config.preview_method,
            step_cache=config.step_cache,
        )
        self.executor = Executor(self.engine)
        notice = _open_history(self.engine, config)
        if self.engine.history is not None:  # a database found damaged mid-run: the client is told, not only the log

            def tell(text: str) -> None:
                log.error("%s", text)
                emit(m.Notice(text))

            self.engine.history.on_notice = tell
        try:
            self.queue = DurableQueue(self.engine.history, background=True)
        except OSError as exc:
            log.error("the queue store is unavailable: %s", exc)
            self.queue = DurableQueue(None)
        self.recorder = _Recorder(self.engine.history, f"{device.torch_device} ({device.name})",
                                  self.engine.model_hash)
        # plain strings only: torch.__version__ is torch's own str subclass, and unpickling it in the client
        # imported torch into the app (seconds of its CPU, every event of the first job held up behind it)
        self.ready = m.WorkerReady(str(device.torch_device), str(device.name), str(device.dtype).replace("torch.", ""),
                                   str(torch.__version__), str(diffusers.__version__), os.getpid(), notice)

    def preload(self, names: tuple[str, ...]) -> None:
        """Load these checkpoints into the model cache before a job asks for them (the app's open workflow's:
        its first job then finds the models loaded, the load done while the user looked at the workflow).
        Through the CheckpointLoaderSimple node itself, so the cache key is the one a job's node looks up; then
        the file's sha256, which the first saved image's metadata names (2 GB hashed: seconds of that save,
        once per file version). A failure is only logged: the job that needs the file reports it."""
        from tui_diffusion.pipeline.context import NodeContext
        from tui_diffusion.pipeline.registry import implementations

        loader = implementations()["CheckpointLoaderSimple"]
        for name in names:
            start = time.perf_counter()
            try:
                loader(NodeContext(self.engine, "preload", {}, report=lambda *_: None, interrupted=lambda: False),
                       ckpt_name=name)
            except Exception as exc:  # a missing or broken file: the job says so
                log.info("preload of %s skipped: %s", name, exc)
            else:
                self.engine.model_hash("checkpoints", name)
                log.info("preloaded %s and its hash in %.2f s", name, time.perf_counter() - start)

    def _hooks(self, job: m.SubmitJob) -> Any:
        from tui_diffusion.pipeline.executor import Hooks

        emit = self.emit

        class _Hooks(Hooks):
            last_preview = 0.0

            def node_started(self, node_id: str) -> None:
                emit(m.NodeStarted(job.job_id, node_id))

            def node_cached(self, node_id: str) -> None:
                emit(m.NodeCached(job.job_id, node_id))

            def node_finished(self, node_id: str, seconds: float) -> None:
                emit(m.NodeFinished(job.job_id, node_id, seconds))

            def progress(self, node_id: str, step: int, total: int, preview: Any) -> None:
                png = None
                now = time.monotonic()
                if preview is not None and (now - self.last_preview > 0.25 or step == total):
                    # a callable preview (a TAESD decode) is made only when it is sent
                    image = preview() if callable(preview) else preview
                    if image is not None:
                        png, self.last_preview = _png(image), now
                emit(m.Progress(job.job_id, node_id, step, total, png))

        return _Hooks()

    def run(self, job: m.SubmitJob, interrupted: Any, stopping: Any = lambda: False) -> Any:
        """Run one job to its end event (also emitted and returned); never raises for a job's failure."""
        from tui_diffusion.pipeline.errors import Interrupted
        from tui_diffusion.pipeline.executor import JobError

        emit, queue, recorder = self.emit, self.queue, self.recorder
        emit(m.JobStarted(job.job_id))
        queue.state(job.job_id, RUNNING)
        recorder.idle.clear()
        recorder.started(job)
        start = time.perf_counter()
        end: Any
        try:
            report = self.executor.run(job.workflow, self._hooks(job), interrupted, previews=job.previews)
            seconds = time.perf_counter() - start
            queue.state(job.job_id, DONE)
            recorder.finished(job, to_store(DONE), outputs=report.outputs, timings=report.timings, seconds=seconds)
            end = m.JobFinished(job.job_id, report.outputs, report.executed, report.cached, report.timings, seconds)
        except Interrupted:
            if not stopping():  # stopped by the worker's end, not the user: left "running", so it can resume
                queue.state(job.job_id, INTERRUPTED)
                recorder.finished(job, to_store(INTERRUPTED), seconds=time.perf_counter() - start)
            end = m.JobFinished(job.job_id, [], [], [], {}, time.perf_counter() - start, status="interrupted")
        except JobError as exc:
            queue.state(job.job_id, FAILED, exc.message)
            recorder.finished(job, to_store(FAILED), error=exc.message, error_node=exc.node_id)
            end = m.JobFailed(job.job_id, exc.node_id, exc.message)
        except Exception as exc:  # never let one job take the worker down
            log.error("job %s failed:\n%s", job.job_id, traceback.format_exc())
            message = f"internal error: {type(exc).__name__}: {exc}"
            queue.state(job.job_id, FAILED, message)
            recorder.finished(job, to_store(FAILED), error=message)
            end = m.JobFailed(job.job_id, None, message)
        # the end is in the store before any client hears of it: a worker killed right after cannot leave a job
        # "done" on screen and "running" in the store (a few milliseconds; bounded if the disk stalls)
        queue.flush(timeout=5.0)
        emit(end)
        if self.device.torch_device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        return end

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued for the store (within ``timeout`` seconds), then give up this worker's claim
        on its jobs: what it did not run is left over for ``resume``, and its lock file goes."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.queue.flush(left())
        self.recorder.flush(left())
        self.queue.release()

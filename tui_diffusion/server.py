"""The background server: the worker and its queue outlive the terminal. Torch-free.

``tui-diffusion serve`` (or ``tui-diffusion --detach``) runs the runtime's ``Supervisor`` over a backend
(one worker, a pool, Ray actors) and listens on a Unix
socket in a folder only the user can enter, with a random key in a file only the user can read
(``multiprocessing.connection``'s challenge; no TCP port). Any number of clients attach: each gets the
worker's state and every job of the server's life, then the live events; each can queue, interrupt,
reorder. A client that goes away (a closed laptop, a dropped SSH connection) takes nothing with it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from tui_diffusion import messages as m
from tui_diffusion.runtime.protocol import Backend, Event, Unbatcher, WorkerDied
from tui_diffusion.runtime.queue import PENDING, UNFINISHED, make_job, state_after
from tui_diffusion.settings import WorkerConfig

log = logging.getLogger("tui_diffusion.server")

RUNTIME_DIR_ENV = "TUI_DIFFUSION_RUNTIME_DIR"
#: finished jobs a server remembers for clients that attach later (the history keeps them all)
KEEP_FINISHED = 500


def runtime_dir() -> Path:
    """The server's folder (socket, key, log), created private to the user."""
    import platformdirs

    base = os.environ.get(RUNTIME_DIR_ENV)
    folder = Path(base) if base else platformdirs.user_runtime_path("tui-diffusion")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def socket_path(folder: Path | None = None) -> Path:
    return (folder or runtime_dir()) / "server.sock"


def _key(folder: Path, create: bool) -> bytes:
    path = folder / "server.key"
    if create:
        tmp = folder / f".server.key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.replace(tmp, path)
    return path.read_bytes()


class ServerError(RuntimeError):
    """No server to attach to, or one that refused us."""


#: seconds a new connection has to pass the key challenge
HANDSHAKE_TIMEOUT = 5.0
#: what one queued job may be: its id, its workflow's nodes and its JSON size
MAX_JOB_ID = 128
MAX_NODES = 10000
MAX_WORKFLOW_BYTES = 16 << 20


def invalid_command(command: Any) -> str | None:
    """Why a message from a client cannot be acted on (None: it can). Every field of every kind is checked:
    the key proves who sent it, not that it is well formed."""
    import json

    def job_id_problem(value: Any) -> str | None:
        if type(value) is not str:
            return f"a job id must be a string, not {type(value).__name__}"
        if not 0 < len(value) <= MAX_JOB_ID or not value.isprintable():
            return f"a job id must be 1 to {MAX_JOB_ID} printable characters"
        return None

    kind = type(command)
    if kind is m.StopServer:
        return None
    if kind not in (m.SubmitJob, m.CancelJob, m.MoveJob):
        return f"unknown message {kind.__name__}"
    missing = object()
    fields = {name: getattr(command, name, missing) for name in ("job_id", "workflow", "previews")
              if kind is m.SubmitJob or name == "job_id"}
    if any(value is missing for value in fields.values()):  # a pickle can build an object without its fields
        return f"a {kind.__name__} without its fields"
    if (why := job_id_problem(fields["job_id"])) is not None or kind is not m.SubmitJob:
        return why
    if type(fields["previews"]) is not bool:
        return "previews must be true or false"
    workflow = fields["workflow"]
    if type(workflow) is not dict or not workflow:
        return "a workflow must be a non-empty mapping of node ids to nodes"
    if len(workflow) > MAX_NODES:
        return f"a workflow of {len(workflow)} nodes (at most {MAX_NODES})"
    for node_id, node in workflow.items():
        if type(node_id) is not str or type(node) is not dict:
            return "a workflow's nodes must be mappings under string ids"
        if type(node.get("class_type")) is not str or type(node.get("inputs", {})) is not dict:
            return f"node {node_id[:40]!r} needs a class_type string and an inputs mapping"
    try:
        size = len(json.dumps(workflow))
    except (TypeError, ValueError, RecursionError) as exc:
        return f"a workflow that is not plain JSON ({type(exc).__name__})"
    if size > MAX_WORKFLOW_BYTES:
        return f"a workflow of {size} bytes (at most {MAX_WORKFLOW_BYTES})"
    return None


def _hang_up(conn: Connection) -> None:
    """End a connection another thread may be blocked reading (close alone would not wake that read)."""
    import socket

    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except OSError:
        pass


class _Link:
    """One attached client. Events go out through a thread of its own, so a client that stops reading (a
    suspended terminal, a stalled link) never holds up the worker or the other clients; one that falls
    too far behind is dropped (it gets the whole state again when it attaches again)."""

    backlog_limit = 20000

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.out: queue.Queue = queue.Queue()
        self.alive = True
        threading.Thread(target=self._send, daemon=True, name="server-send").start()

    def offer(self, event: Any) -> None:
        if self.out.qsize() > self.backlog_limit:
            self.close()
        elif self.alive:
            self.out.put(event)

    def _send(self) -> None:
        while self.alive:
            event = self.out.get()
            if event is None:
                break
            try:
                self.conn.send(event)
            except (OSError, ValueError):
                break
        self.close()

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self.out.put(None)
            _hang_up(self.conn)  # the reading thread may be blocked in recv: close alone would not end it
            try:
                self.conn.close()
            except OSError:
                pass


# -- the server ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, config: WorkerConfig, folder: Path | None = None, backend: Backend | None = None,
                 factory: Callable[[WorkerConfig], Backend] | None = None) -> None:
        """``factory`` makes the backend (and its replacements, when one dies); ``backend``: a first one already
        made. Either way the jobs go through the runtime's supervisor: one policy, one durable queue."""
        from tui_diffusion.runtime.supervisor import Supervisor, local_worker

        self.folder = folder or runtime_dir()
        self.address = socket_path(self.folder)
        if server_running(self.folder):
            raise ServerError(f"a server already runs on {self.address}")
        self.address.unlink(missing_ok=True)  # left by a server that died
        #: where the jobs run: one worker, or a pool / Ray backend (tui_diffusion.backends), supervised
        self.backend = Supervisor(config, factory or local_worker, backend=backend)
        self.key = _key(self.folder, create=True)
        # no authkey here: the challenge runs per connection in _handshake, off the accepting thread
        self.listener = Listener(str(self.address), family="AF_UNIX", backlog=64)
        os.chmod(self.address, 0o600)
        self.clients: list[_Link] = []
        self.lock = threading.Lock()
        self.commands: queue.Queue = queue.Queue()
        self.jobs: collections.OrderedDict[str, m.JobSummary] = collections.OrderedDict()
        self.stopping = threading.Event()

    # -- clients ---------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        """Take connections; each one's key challenge runs in a thread of its own with a time limit, so a
        client that connects and says nothing (or half a message) holds up nobody else."""
        while not self.stopping.is_set():
            try:
                conn = self.listener.accept()
            except (OSError, EOFError):
                if self.stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. out of file descriptors: do not spin
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True, name="server-handshake").start()

    def _handshake(self, conn: Connection) -> None:
        from multiprocessing.connection import answer_challenge, deliver_challenge

        timer = threading.Timer(HANDSHAKE_TIMEOUT, _hang_up, args=(conn,))
        timer.start()
        try:
            deliver_challenge(conn, self.key)  # as Listener(authkey=...) would, both ways
            answer_challenge(conn, self.key)
        except Exception as exc:  # a wrong key, a client that hung up or stayed silent: that connection only
            log.info("a connection failed the key challenge (%s); closed", type(exc).__name__)
            _close_quietly(conn)
            return
        finally:
            timer.cancel()
        self.commands.put(("attach", conn))

    def _read(self, link: _Link) -> None:
        while link.alive:
            try:
                command = link.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a message that does not unpickle (or nests too deep): that client's problem only
                log.warning("a client sent a message that cannot be read (%s); it is disconnected", type(exc).__name__)
                break
            why = invalid_command(command)
            if why is not None:
                log.warning("a client sent a bad message (%s); it is disconnected", why)
                break
            self.commands.put(("command", (link, command)))
        self.commands.put(("detach", link))

    def _broadcast(self, event: Any) -> None:
        for link in list(self.clients):
            link.offer(event)
            if not link.alive:
                self._drop(link)

    def _drop(self, link: _Link) -> None:
        if link in self.clients:
            self.clients.remove(link)
        link.close()

    # -- jobs ------------------------------------------------------------------------------------------------
    def _track(self, event: Event) -> None:
        job_id = getattr(event, "job_id", None)
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            return
        change: dict[str, Any] = {}
        state = state_after(event)
        if state is not None:
            change["status"] = state
        if isinstance(event, m.JobPlaced):
            change["worker"] = event.worker
        elif isinstance(event, m.Progress):
            change.update(node_id=event.node_id, step=event.step, total=event.total)
        elif isinstance(event, m.NodeStarted):
            change.update(node_id=event.node_id, step=0, total=0)
        elif isinstance(event, m.JobFinished):
            change.update(outputs=list(event.outputs), seconds=event.seconds, node_id=None,
                          executed=list(event.executed), cached=list(event.cached))
        elif isinstance(event, m.JobFailed):
            change.update(error=event.message, error_node=event.node_id, node_id=None)
        if change:
            self.jobs[job.job_id] = dataclasses.replace(job, **change)
        finished = [k for k, j in self.jobs.items() if j.status not in UNFINISHED]
        for stale in finished[:-KEEP_FINISHED]:
            del self.jobs[stale]

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "attach":
            link = _Link(payload)
            link.offer(m.Attached(self.backend.ready, list(self.jobs.values()), os.getpid()))
            self.clients.append(link)
            threading.Thread(target=self._read, args=(link,), daemon=True, name="server-client").start()
        elif kind == "detach":
            self._drop(payload)
        else:
            link, command = payload
            try:
                self._command(command)
            except Exception:  # whatever a checked message still breaks costs its sender only, never the server
                log.exception("a client's command failed; it is disconnected")
                self._drop(link)

    def _command(self, payload: Any) -> None:
        if isinstance(payload, m.SubmitJob):
            known = self.jobs.get(payload.job_id)
            if known is not None and known.status in UNFINISHED:  # one job, one id
                raise ValueError(f"job id {payload.job_id!r} is queued already")
            self.jobs.pop(payload.job_id, None)  # an ended job run again (resume) goes to the end
            self.jobs[payload.job_id] = m.JobSummary(payload.job_id, payload.workflow, payload.previews)
            self.backend.submit(payload.workflow, previews=payload.previews, job_id=payload.job_id)
            self._broadcast(m.JobQueued(self.jobs[payload.job_id]))
        elif isinstance(payload, m.CancelJob):
            self.backend.cancel(payload.job_id)
        elif isinstance(payload, m.MoveJob):
            job = self.jobs.pop(payload.job_id, None)
            if job is not None:
                ahead = [(k, v) for k, v in self.jobs.items() if v.status != PENDING]
                behind = [(k, v) for k, v in self.jobs.items() if v.status == PENDING]
                self.jobs = collections.OrderedDict(ahead + [(job.job_id, job)] + behind)
            self.backend.move_to_front(payload.job_id)
        elif isinstance(payload, m.StopServer):
            self.stopping.set()

    def serve_forever(self) -> int:
        """Run until asked to stop (``tui-diffusion serve --stop``, SIGTERM); 0, or 1 if the worker cannot run."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal to lose
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        self.backend.start()
        threading.Thread(target=self._accept, daemon=True, name="server-accept").start()
        code = 0
        try:
            while not self.stopping.is_set():
                while True:
                    try:
                        self._handle(*self.commands.get_nowait())
                    except queue.Empty:
                        break
                try:
                    event = self.backend.next_event(timeout=0.05)
                except WorkerDied as exc:
                    log.error("the worker cannot run: %s", exc)
                    self._broadcast(m.WorkerFailed(str(exc)))
                    code = 1
                    break
                if event is None:
                    continue
                if isinstance(event, m.WorkerFailed):
                    self._broadcast(event)
                    code = 1
                    break
                self._track(event)
                self._broadcast(event)
        finally:
            self.close()
        return code

    def close(self) -> None:
        self.stopping.set()
        for link in list(self.clients):
            self._drop(link)
        try:
            self.listener.close()
        except OSError:
            pass
        self.address.unlink(missing_ok=True)
        self.backend.close()


def server_running(folder: Path | None = None) -> bool:
    """Whether a server answers on this user's socket."""
    address = socket_path(folder)
    if not address.exists():
        return False
    try:
        conn = Client(str(address), family="AF_UNIX", authkey=_key(address.parent, create=False))
    except (OSError, EOFError):
        return False
    except Exception as exc:  # AuthenticationError: someone else's socket, or a stale key
        log.debug("the socket %s did not accept our key: %s", address, exc)
        return False
    conn.close()
    return True


def start_background(args: list[str], folder: Path | None = None, timeout: float = 30.0) -> int:
    """Start ``tui-diffusion serve`` in its own session (off this terminal: a hang-up does not reach it) and
    wait until it answers; returns its pid."""
    import subprocess
    import sys

    folder = folder or runtime_dir()
    log_file = open(folder / "server.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "tui_diffusion", "serve", *args], stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=log_file, start_new_session=True, close_fds=True,
                            env={**os.environ, RUNTIME_DIR_ENV: str(folder)})
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_running(folder):
            return proc.pid
        if proc.poll() is not None:
            raise ServerError(f"the server stopped at once (exit code {proc.returncode}); see {folder / 'server.log'}")
        time.sleep(0.05)
    raise ServerError(f"the server did not answer within {timeout:.0f} s; see {folder / 'server.log'}")


# -- the client's end ------------------------------------------------------------------------------------------
class RemoteClient:
    """The remote backend: the backend protocol over a running server's socket. Closing it detaches; the
    server carries on. The server records and supervises its jobs itself (``records_queue`` is False)."""

    remote = True
    records_queue = False

    def __init__(self, config: WorkerConfig | None = None, folder: Path | None = None) -> None:
        self.folder = folder
        self.conn: Connection | None = None
        self.ready: m.WorkerReady | None = None
        self.attached: m.Attached | None = None
        self.process = None
        self._lock = threading.Lock()
        self._first = Unbatcher()

    def start(self) -> None:
        address = socket_path(self.folder)
        try:
            self.conn = Client(str(address), family="AF_UNIX", authkey=_key(address.parent, create=False))
            hello = self.conn.recv()
        except (OSError, EOFError) as exc:
            raise ServerError(f"no server answers on {address}: {exc}") from None
        except Exception as exc:  # AuthenticationError
            raise ServerError(f"the server on {address} refused this client: {exc}") from None
        self.attached = hello
        self.ready = hello.ready
        self._first.push_front([hello])  # the snapshot is the first event the caller sees

    def wait_ready(self, timeout: float | None = None) -> m.WorkerReady:
        """Block until the server's worker is ready; the events that came first are kept for the caller."""
        deadline = None if timeout is None else time.monotonic() + timeout
        early: list[Event] = []
        while self.ready is None:
            event = self.next_event(0.2)
            if isinstance(event, m.WorkerFailed):
                raise WorkerDied(event.message)
            if event is not None:
                early.append(event)
            if deadline is not None and time.monotonic() >= deadline and self.ready is None:
                raise TimeoutError("the server's worker did not become ready in time")
        self._first.push_front(early)
        return self.ready

    def _send(self, command: Any) -> None:
        with self._lock:
            if self.conn is None:
                raise WorkerDied("not attached to a server")
            try:
                self.conn.send(command)
            except (OSError, ValueError) as exc:
                raise WorkerDied(f"the server went away: {exc}") from None

    def submit(self, workflow: Any, previews: bool = False, job_id: str | None = None) -> str:
        job = make_job(workflow, previews, job_id)
        self._send(job)
        return job.job_id

    def cancel(self, job_id: str) -> None:
        self._send(m.CancelJob(job_id))

    def move_to_front(self, job_id: str) -> None:
        self._send(m.MoveJob(job_id))

    def stop_server(self) -> None:
        self._send(m.StopServer())

    def next_event(self, timeout: float | None = None) -> Event | None:
        if self._first:
            return self._first.pop()
        conn = self.conn
        if conn is None:
            raise WorkerDied("not attached to a server")
        try:
            if not conn.poll(timeout):
                return None
            event = conn.recv()
        except (EOFError, OSError):
            if self.conn is None:  # closed by this client (detaching) while another thread read
                return None
            raise WorkerDied("the server went away") from None
        event = self._first.take(event)
        if isinstance(event, m.WorkerReady):
            self.ready = event
        return event

    def close(self, timeout: float = 0.0) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None

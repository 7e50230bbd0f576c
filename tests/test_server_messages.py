"""The background server against a client that holds the key but misbehaves (issue 14, items 2 and 3): a
malformed message costs only its sender the connection, and a client that connects and stays silent holds up
nobody. The server runs in its own process with a worker double, so these take seconds, not minutes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tui_diffusion import messages as m
from tui_diffusion.server import HANDSHAKE_TIMEOUT, invalid_command, server_running, socket_path

SERVE = """
import sys
from pathlib import Path
from tests.fakes import FakeClient
from tui_diffusion.server import Server
from tui_diffusion.settings import WorkerConfig
class Backend(FakeClient):
    ready = None
config = WorkerConfig(record_history=False)
server = Server(config, Path(sys.argv[1]), backend=Backend(config))
sys.exit(server.serve_forever())
"""
GOOD = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


@pytest.fixture()
def server() -> Iterator[tuple[Path, subprocess.Popen]]:
    folder = Path(tempfile.mkdtemp(prefix="td-"))  # short: a Unix socket's path is limited
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(folder)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not server_running(folder):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    try:
        yield folder, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def _attach(folder: Path) -> Any:
    conn = Client(str(socket_path(folder)), family="AF_UNIX", authkey=(folder / "server.key").read_bytes())
    assert isinstance(conn.recv(), m.Attached)
    return conn


def _dropped(conn: Any, timeout: float = 5) -> bool:
    """Whether the server closed this connection (events it sent first are read past)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if conn.poll(0.1):
                conn.recv()
    except (EOFError, OSError):
        return True
    return False


def _answers(folder: Path, within: float) -> bool:
    """Whether a new client is let in within ``within`` seconds (checked from a thread: a hung server hangs it)."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(server_running(folder)), daemon=True)
    thread.start()
    thread.join(within)
    return result == [True]


BAD = [
    m.MoveJob(["x"]),  # the one that killed the server: a list as a job id
    m.SubmitJob(["x"], GOOD),
    m.SubmitJob("a", "not a workflow"),
    m.SubmitJob("a", {"1": "not a node"}),
    m.SubmitJob("a", {"1": {"inputs": {}}}),
    m.SubmitJob("a", GOOD, previews="yes"),
    m.SubmitJob("", GOOD),
    m.SubmitJob("a", {"1": {"class_type": "X", "inputs": {"v": {1, 2}}}}),  # not JSON
    m.CancelJob(None),
    m.MoveJob({"a": 1}),
    {"not": "a message"},
    "text",
]


@pytest.mark.parametrize("message", BAD, ids=[f"{type(b).__name__}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_message_is_refused(message: Any) -> None:
    assert invalid_command(message) is not None


def test_a_bad_message_costs_only_its_sender_the_connection(server: tuple[Path, subprocess.Popen]) -> None:
    folder, proc = server
    bystander = _attach(folder)
    for message in BAD:
        conn = _attach(folder)
        conn.send(message)
        assert _dropped(conn), message
        assert proc.poll() is None, f"the server died on {message!r}: {proc.stderr.read() if proc.stderr else ''}"
    bystander.send(m.SubmitJob("good-1", GOOD))  # the other client was never touched
    deadline = time.monotonic() + 10
    event = None
    while not (isinstance(event, m.JobQueued) and event.job.job_id == "good-1"):
        assert time.monotonic() < deadline
        event = bystander.recv() if bystander.poll(0.2) else None
    bystander.send(m.SubmitJob("good-1", GOOD))  # an id already queued is refused too
    assert _dropped(bystander)
    assert _answers(folder, within=5)


def test_a_silent_client_blocks_no_other_and_is_hung_up_on(server: tuple[Path, subprocess.Popen]) -> None:
    folder, _proc = server
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(socket_path(folder)))  # and never answers the key challenge
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(socket_path(folder)))
    half.sendall(b"\x00\x00\x01\x00" + b"x")  # announces 256 bytes, sends one
    started = time.monotonic()
    assert _answers(folder, within=3)  # `serve --status` and every other client used to hang here
    assert _attach(folder) is not None
    silent.settimeout(HANDSHAKE_TIMEOUT + 5)
    received = b""
    while chunk := silent.recv(4096):  # the challenge, then the end of the connection
        received += chunk
    assert received and time.monotonic() - started < HANDSHAKE_TIMEOUT + 3
    silent.close()
    half.close()
    assert _answers(folder, within=3)


def test_the_server_process_survives_a_client_killed_mid_message(server: tuple[Path, subprocess.Popen]) -> None:
    folder, proc = server
    code = ("import sys; from multiprocessing.connection import Client; from pathlib import Path; "
            "f = Path(sys.argv[1]); c = Client(str(f / 'server.sock'), family='AF_UNIX', "
            "authkey=(f / 'server.key').read_bytes()); c.recv(); "
            "import os; os.write(c.fileno(), b'\\x00\\x10\\x00\\x00partial'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(folder)], timeout=30)
    assert proc.poll() is None and _answers(folder, within=5)
    assert os.path.exists(socket_path(folder))

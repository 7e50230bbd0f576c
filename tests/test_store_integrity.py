"""The history database under damage (issue 14, items 14-17): a damaged file is found at open and when a read
or write fails, moved aside under a name of its own, replaced by one holding every job still readable, and the
user is told; session lock files do not pile up."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tui_diffusion.settings import DevicePolicy, WorkerConfig
from tui_diffusion.store import history as store
from tui_diffusion.store.history import History, Session, clean_sessions, session_alive

WORKFLOW = {str(i): {"class_type": "X", "inputs": {"text": "y" * 200}} for i in range(10)}
PAGE = 4096


def _filled(path: Path, jobs: int = 300) -> History:
    """A history of ``jobs`` finished jobs, everything checkpointed into the main file."""
    h = History(path)
    for i in range(jobs):
        h.job_queued(f"j{i}", WORKFLOW, "s")
        h.job_state(f"j{i}", "ok")
    h.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return h


def _scribble(path: Path, pages: range, seed: int = 1) -> None:
    """Random bytes over whole pages of a database file, as a failing disk leaves them."""
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for n in pages:
            f.seek(n * PAGE)
            f.write(bytes(rnd.randrange(256) for _ in range(PAGE)))


def _aside(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


def test_two_damaged_databases_in_the_same_second_keep_both_copies(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.time, "strftime", lambda *_: "20260101-000000")  # the same second, twice
    path = tmp_path / "h.sqlite3"
    notices = []
    for text in (b"first damaged copy", b"second damaged copy"):
        path.write_bytes(text * 200)
        h = History(path)
        notices.append(h.notice)
        h.close()
    copies = _aside(tmp_path)
    assert len(copies) == 2
    assert sorted(p.read_bytes()[:18] for p in copies) == [b"first damaged copy", b"second damaged cop"]
    for notice, copy in zip(notices, copies, strict=True):  # each message names where its copy really is
        assert str(copy) in notice


def test_partial_damage_is_found_at_open_and_readable_jobs_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    _filled(path).close()
    _scribble(path, range(20, 35))  # pages 20-34: the file still opens and counts its rows
    h = History(path)
    assert h.notice and "was damaged" in h.notice and "moved to" in h.notice
    copies = _aside(tmp_path)
    assert len(copies) == 1 and str(copies[0]) in h.notice
    rows = h.jobs(limit=1000)  # the old file failed "malformed" here on every call
    assert 200 < len(rows) < 300 and f"the {len(rows)} job(s)" in h.notice
    assert [row[0] for row in h.db.execute("PRAGMA integrity_check")] == ["ok"]


def test_a_write_that_meets_damage_recovers_and_keeps_this_process_jobs(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    h = _filled(path)
    told: list[str] = []
    h.on_notice = told.append
    h.job_queued("mine-1", WORKFLOW, "session-a")  # pending: this process answers for it
    h.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = h.db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs_status'").fetchone()[0]
    _scribble(path, range(root - 1, root))  # the status index, under an open connection
    h.db.execute("PRAGMA shrink_memory")  # as if its pages had left the cache
    h.job_queued("mine-2", WORKFLOW, "session-a")  # failed with "malformed" and was lost
    assert told and "was damaged" in told[0] and len(_aside(tmp_path)) == 1
    pending = {r.id: r.status for r in h.jobs(limit=1000) if r.id.startswith("mine")}
    assert pending == {"mine-1": "pending", "mine-2": "pending"}
    assert len(h.jobs(limit=1000)) == 302
    other = History(path)  # another process's view: the new file, sound
    assert other.notice is None and len(other.jobs(limit=1000)) == 302


def test_another_process_follows_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = _filled(path, jobs=50)
    second = History(path)
    _scribble(path, range(3, 6))
    first.db.execute("PRAGMA shrink_memory")
    first._recover(sqlite3.DatabaseError("database disk image is malformed"))  # as a failing write would
    second.job_queued("late", WORKFLOW, "s")  # goes to the new file, not the copy moved aside
    assert "late" in {r.id for r in History(path).jobs(limit=1000)}


def test_the_run_history_unavailable_is_said_by_the_supervisor(tmp_path: Path) -> None:
    from tui_diffusion.supervisor import Supervisor

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    supervisor = Supervisor(WorkerConfig(device=DevicePolicy("cpu"), db_path=blocker / "history.sqlite3"))
    assert supervisor.notice and "unavailable" in supervisor.notice and "not recorded" in supervisor.notice
    damaged = tmp_path / "h.sqlite3"
    damaged.write_bytes(b"garbage" * 500)
    supervisor = Supervisor(WorkerConfig(device=DevicePolicy("cpu"), db_path=damaged))
    assert supervisor.notice and "moved to" in supervisor.notice
    supervisor.session.close()


def test_session_files_go_with_their_sessions_and_stale_ones_are_cleaned(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    folder = tmp_path / "h.sqlite3.sessions"
    live = Session(db)
    ended = Session(db)
    ended.close()
    assert sorted(folder.glob("*.lock")) == [live.path]  # a closed session leaves no file
    stale = folder / ("d" * 32 + ".lock")  # left by a process that was killed (its lock died with it)
    stale.write_text("")
    os.utime(stale, (1, 1))
    assert clean_sessions(folder) == 1 and not stale.exists()
    assert live.path.exists() and session_alive(db, live.id)  # a held one is never removed
    Session(db).close()  # each new session cleans as well
    live.close()
    assert list(folder.glob("*.lock")) == []


def test_a_process_exit_removes_its_session_file(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from tui_diffusion.store.history import Session; "
            "Session(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "h.sqlite3")], check=True, timeout=60)
    assert list((tmp_path / "h.sqlite3.sessions").glob("*.lock")) == []


@pytest.mark.slow
def test_run_says_the_database_was_moved_aside_and_leaves_no_session_files(tiny_home: Path) -> None:
    db = tiny_home / "history.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUI_DIFFUSION_DB": str(db),
           "TUI_DIFFUSION_MODELS_DIR": str(tiny_home / "models"), "TUI_DIFFUSION_OUTPUT_DIR": str(tiny_home / "out")}
    run = subprocess.run([sys.executable, "-m", "tui_diffusion", "run", "workflows/txt2img.json", "--cpu",
                          "--set", f"4.ckpt_name={TINY}", "--set", "5.width=64", "--set", "5.height=64",
                          "--set", "3.steps=2", "--sweep", "3.seed=1,2"], cwd=tiny_home, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    copies = _aside(tiny_home)
    assert len(copies) == 1 and f"moved to {copies[0]}" in run.stderr and "warning:" in run.stderr
    assert list((tiny_home / "history.sqlite3.sessions").glob("*.lock")) == []  # the run and its worker's
    assert [r.status for r in History(db).jobs()] == ["ok", "ok"]

"""Run history and model hashes in SQLite (WAL, a schema version, migrations). Torch-free.

The worker writes a row per job; the CLI and the TUI read them. Several processes may use the database
at once. A corrupt database is moved aside (never deleted) and a new one started; one from a newer
version of the program is refused with a message rather than touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

DB_ENV = "TUI_DIFFUSION_DB"
SCHEMA_VERSION = 2

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,
        workflow TEXT NOT NULL,
        changes TEXT NOT NULL DEFAULT '{}',
        prompt TEXT NOT NULL DEFAULT '',
        error TEXT,
        error_node TEXT,
        timings TEXT NOT NULL DEFAULT '{}',
        device TEXT NOT NULL DEFAULT '',
        outputs TEXT NOT NULL DEFAULT '[]',
        models TEXT NOT NULL DEFAULT '{}',
        seconds REAL
    );
    CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
    CREATE TABLE IF NOT EXISTS model_hashes (
        path TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sha256 TEXT NOT NULL
    );
    """,
    # the durable queue: a job's row is written when the worker accepts it; ``session`` names the worker
    # that holds it, so jobs left behind by a worker that died can be told from those of a live one
    2: """
    ALTER TABLE jobs ADD COLUMN session TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN previews INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
    """,
}

#: a job's states in the store; ``pending`` and ``running`` rows of a dead session are left over
UNFINISHED = ("pending", "running")


class StoreError(Exception):
    """The history database cannot be used; the message says which file and why."""


def default_db_path() -> Path:
    return Path(os.environ.get(DB_ENV) or platformdirs.user_data_path("tui-diffusion") / "history.sqlite3")


@dataclass
class JobRow:
    id: str
    created: float
    finished: float | None
    status: str
    workflow: dict[str, Any]
    changes: dict[str, Any]
    prompt: str
    error: str | None
    error_node: str | None
    timings: dict[str, float]
    device: str
    outputs: list[dict[str, str]]
    models: dict[str, str]
    seconds: float | None
    session: str = ""
    previews: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class History:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or default_db_path())
        self.notice: str | None = None
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not any(word in str(exc).lower() for word in ("not a database", "malformed", "corrupt")):
                raise StoreError(f"{self.path}: {exc}") from None  # e.g. locked by another program: leave it be
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.notice = f"{self.path} was damaged ({exc}); it was moved to {aside} and a new one started"
            self._open()

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=15, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a commit need not wait for the disk
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.db.close()
            raise StoreError(f"{self.path}: written by a newer tui-diffusion (schema {version}, this one knows "
                             f"{SCHEMA_VERSION}); upgrade, or point {DB_ENV} at another file")
        for target in range(version + 1, SCHEMA_VERSION + 1):  # each migration is one transaction
            self.db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[target]} PRAGMA user_version = {target}; COMMIT;")
        self.db.execute("SELECT count(*) FROM jobs").fetchone()  # a damaged file fails here, not later

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:  # one connection, several threads (the worker's job loop and its recorder)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # -- jobs ---------------------------------------------------------------------------------------------
    def job_queued(self, job_id: str, workflow: dict[str, Any], session: str, previews: bool = False) -> None:
        """The durable queue: written before the job is acknowledged. A resubmitted job keeps its id."""
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO jobs (id, created, status, workflow, session, previews) "
                "VALUES (?, ?, 'pending', ?, ?, ?)",
                (job_id, time.time(), json.dumps(workflow), session, int(previews)))

    def job_state(self, job_id: str, status: str, error: str | None = None) -> None:
        """A job's state as it changes (running, ok, error, interrupted, removed): small, written at once."""
        final = status not in UNFINISHED
        with self._transaction():
            self.db.execute(
                "UPDATE jobs SET status = ?, finished = CASE WHEN ? THEN ? ELSE finished END, "
                "error = COALESCE(?, error) WHERE id = ?", (status, final, time.time(), error, job_id))

    def job_started(self, job_id: str, workflow: dict[str, Any], changes: dict[str, Any], prompt: str,
                    device: str) -> None:
        """What the history shows of a job (its changes, prompt, device); the state is job_state's."""
        with self._transaction():
            self.db.execute(
                "INSERT INTO jobs (id, created, status, workflow, changes, prompt, device) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET changes = excluded.changes, prompt = excluded.prompt, "
                "device = excluded.device",
                (job_id, time.time(), json.dumps(workflow), json.dumps(changes), prompt, device))

    def left_over(self) -> list[JobRow]:
        """Jobs queued or running in a worker that is gone (a crash, a reboot, a closed terminal), oldest
        first: what can be resumed."""
        with self._lock:
            sessions = [r[0] for r in self.db.execute(
                "SELECT DISTINCT session FROM jobs WHERE status IN ('pending', 'running')")]
        dead = [s for s in sessions if not session_alive(self.path, s)]
        if not dead:
            return []
        marks = ",".join("?" * len(dead))
        return list(reversed(self._rows(f"SELECT * FROM jobs WHERE status IN ('pending', 'running') "
                                        f"AND session IN ({marks}) ORDER BY created DESC", dead)))

    def _rows(self, sql: str, args: list[Any]) -> list[JobRow]:
        with self._lock:
            cursor = self.db.execute(sql, args)
            names = [d[0] for d in cursor.description]
            fetched = cursor.fetchall()
        rows = []
        for values in fetched:
            raw = dict(zip(names, values, strict=True))
            for key in ("workflow", "changes", "timings", "outputs", "models"):
                raw[key] = json.loads(raw[key])
            rows.append(JobRow(**raw))
        return rows

    def job_finished(self, job_id: str, status: str, *, outputs: list[str] = (),
                     timings: dict[str, float] | None = None, error: str | None = None,
                     error_node: str | None = None, models: dict[str, str] | None = None,
                     seconds: float | None = None) -> None:
        files = []
        for out in outputs:
            p = Path(out)
            files.append({"path": str(p), "sha256": sha256_file(p) if p.is_file() else ""})
        with self._transaction():
            self.db.execute(
                "UPDATE jobs SET finished = ?, status = ?, outputs = ?, timings = ?, error = ?, error_node = ?, "
                "models = ?, seconds = ? WHERE id = ?",
                (time.time(), status, json.dumps(files), json.dumps(timings or {}), error, error_node,
                 json.dumps(models or {}), seconds, job_id))

    def jobs(self, limit: int = 50, text: str | None = None) -> list[JobRow]:
        sql = "SELECT * FROM jobs"
        args: list[Any] = []
        if text:
            sql += " WHERE prompt LIKE ? ESCAPE '!'"
            args.append("%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%")
        sql += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        return self._rows(sql, args)

    def delete_job(self, job_id: str, delete_files: bool = False) -> list[str]:
        """Remove a job's row (and, if asked, its output files); returns the files removed."""
        with self._lock:
            row = self.db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()
        removed: list[str] = []
        if row and delete_files:
            for out in json.loads(row[0]):
                p = Path(out["path"])
                if p.is_file():
                    p.unlink()
                    removed.append(str(p))
        with self._transaction():
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return removed

    # -- model hashes ---------------------------------------------------------------------------------------
    def model_hash(self, path: Path) -> str:
        """sha256 of a model file, computed once per (path, size, mtime)."""
        path = path.resolve()
        st = path.stat()
        with self._lock:
            row = self.db.execute("SELECT size, mtime_ns, sha256 FROM model_hashes WHERE path = ?",
                                  (str(path),)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        digest = sha256_file(path)
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO model_hashes VALUES (?, ?, ?, ?)",
                            (str(path), st.st_size, st.st_mtime_ns, digest))
        return digest


# -- sessions: which worker holds which queued jobs ------------------------------------------------------------
def _sessions_dir(db_path: Path) -> Path:
    return db_path.parent / f"{db_path.name}.sessions"


class Session:
    """A worker's claim on the jobs it queued: an exclusive lock on a small file, held for as long as the
    process lives and released by the kernel when it dies however it dies (kill -9, a crash, a reboot)."""

    def __init__(self, db_path: Path) -> None:
        import fcntl
        import uuid

        self.id = uuid.uuid4().hex
        folder = _sessions_dir(db_path)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.id}.lock"
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def session_alive(db_path: Path, session: str) -> bool:
    """Whether the worker that holds ``session`` still runs (its lock is held)."""
    import fcntl

    if not session:
        return False
    path = _sessions_dir(db_path) / f"{session}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)  # its owner is gone: nobody will release it
    return False

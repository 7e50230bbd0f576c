"""Run history and model hashes in SQLite (WAL, a schema version, migrations). Torch-free.

A row per job, written through the runtime's queue (``runtime.queue``, in the client and in the worker) and
the worker's recorder; the CLI and the TUI read them. Several processes may use the database
at once. A corrupt database is moved aside (never deleted) and a new one started; one from a newer
version of the program is refused with a message rather than touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger("tui_diffusion.store")

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
    # the durable queue: a job's row is written when the runtime accepts it; ``session`` names the process
    # that holds it, so jobs left behind by a process that died can be told from those of a live one
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


def _damaged(exc: BaseException) -> bool:
    """Whether a database error says the file is damaged (not merely busy, locked or read-only)."""
    text = str(exc).lower()
    return any(word in text for word in ("not a database", "malformed", "corrupt"))


class History:
    """One process's connection to the history and the durable queue.

    The file is checked at open (``PRAGMA quick_check``) and again whenever a read or a write fails: a
    damaged one is moved aside under a name of its own (never over an earlier copy), a new one is started
    with every job that can still be read from the old, and the jobs this process queued are written
    again, so the queue stays durable. ``notice`` (and ``on_notice``) say what happened."""

    def __init__(self, path: Path | None = None, recover: bool = True) -> None:
        """``recover=False``: a damaged file raises ``StoreError`` and is left as it is, for the process that
        reports to the user (the worker) to move aside and say so."""
        self.path = Path(path or default_db_path())
        self._may_recover = recover
        self.notice: str | None = None
        #: called with each notice (the worker passes it on to its client); never raises into a write
        self.on_notice: Any = None
        self._lock = threading.RLock()
        #: jobs this process queued and has not seen end: written again if the file has to be replaced
        self._mine: dict[str, tuple[Any, ...]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
            self._check()
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                raise StoreError(f"{self.path}: {exc}") from None  # e.g. locked by another program: leave it be
            self._recover(exc)

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=15, isolation_level=None, check_same_thread=False)
        self._inode = self.path.stat().st_ino  # to see another process replace a damaged file
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

    def _check(self) -> None:
        """``PRAGMA quick_check``: damaged pages anywhere (an index, a table's inner pages) raise here, at open,
        instead of failing some later read or write."""
        found = [row[0] for row in self.db.execute("PRAGMA quick_check(3)")]
        if found != ["ok"]:
            first = " ".join(found[-1].split())[:160]  # the first lines only name the database
            raise sqlite3.DatabaseError(f"database disk image is malformed ({first})")

    def _say(self, text: str) -> None:
        self.notice = text
        if self.on_notice is not None:
            try:
                self.on_notice(text)
            except Exception:  # a notice is news, never a reason for the write that found the damage to fail
                log.exception("could not pass on a notice about %s", self.path)

    def _recover(self, exc: BaseException) -> None:
        """Move the damaged file aside and start a new one holding what can be read from it and this process's
        own queued jobs. One process at a time (a lock file): a second one that finds the file already
        replaced only reconnects."""
        if not self._may_recover:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self.db.close()
            raise StoreError(f"{self.path}: damaged ({exc}); left for the worker to move aside")
        import fcntl

        with self._lock:
            try:
                self.db.close()
            except Exception as failure:  # the damaged connection may not even close; a new one replaces it anyway
                log.info("closing the damaged connection to %s failed: %s", self.path, failure)
            folder = _sessions_dir(self.path)
            folder.mkdir(parents=True, exist_ok=True)
            guard = os.open(folder / "recover.guard", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
                damaged_inode = getattr(self, "_inode", None)
                try:
                    current = self.path.stat().st_ino
                except FileNotFoundError:
                    current = None
                if damaged_inode is not None and current is not None and current != damaged_inode:
                    self._open()  # another process moved it aside already
                    self._check()
                else:
                    aside = _move_aside(self.path)
                    self._open()
                    saved = self._salvage(aside)
                    self._say(f"{self.path} was damaged ({exc}); it was moved to {aside} and a new one started "
                              f"with the {saved} job(s) that could be read from it")
            finally:
                os.close(guard)
            self._rewrite_mine()

    def _salvage(self, aside: Path) -> int:
        """Copy every job row that can still be read from a damaged file into the new one; how many."""
        rows: dict[str, tuple[list[str], tuple[Any, ...]]] = {}
        try:
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, timeout=1)
        except sqlite3.Error:
            return 0
        try:
            for sql in ("SELECT * FROM jobs ORDER BY rowid", "SELECT * FROM jobs ORDER BY rowid DESC",
                        "SELECT * FROM jobs WHERE status IN ('pending', 'running')"):
                try:
                    cursor = old.execute(sql)
                    names = [d[0] for d in cursor.description]
                    for values in cursor:  # as far as the damage allows
                        rows.setdefault(str(values[names.index("id")]), (names, values))
                except (sqlite3.Error, ValueError):
                    continue
        finally:
            old.close()
            Path(f"{aside}-shm").unlink(missing_ok=True)  # made by this read; an empty log likewise
            wal = Path(f"{aside}-wal")
            if wal.exists() and wal.stat().st_size == 0:
                wal.unlink()
        known = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        saved = 0
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for names, values in rows.values():
                    keep = [(n, v) for n, v in zip(names, values, strict=True) if n in known]
                    try:
                        self.db.execute(f"INSERT OR IGNORE INTO jobs ({', '.join(n for n, _ in keep)}) "
                                        f"VALUES ({', '.join('?' * len(keep))})", [v for _, v in keep])
                        saved += 1
                    except sqlite3.Error:
                        continue  # a row damaged beyond use (a NULL where none may be)
            finally:
                self.db.execute("COMMIT")
        return saved

    def _rewrite_mine(self) -> None:
        """The jobs this process queued, written again into a new file (INSERT OR IGNORE: a salvaged row wins,
        it may be newer)."""
        if not self._mine:
            return
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for job_id, (created, status, workflow, session, previews) in self._mine.items():
                    self.db.execute("INSERT OR IGNORE INTO jobs (id, created, status, workflow, session, previews) "
                                    "VALUES (?, ?, ?, ?, ?, ?)", (job_id, created, status, workflow, session, previews))
            finally:
                self.db.execute("COMMIT")

    def _guarded(self, work: Any) -> Any:
        """Run ``work()`` (a read or a write); if it fails because the file is damaged, or another process
        replaced it, recover and run it once more. A second failure is the caller's."""
        with self._lock:
            try:
                if self.path.stat().st_ino != self._inode:  # moved aside by another process: follow it
                    self.db.close()
                    self._open()
                    self._rewrite_mine()
            except (OSError, sqlite3.Error):
                pass
            try:
                return work()
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc) and not self._fails_check():
                    raise
                self._recover(exc)
            return work()

    def _fails_check(self) -> bool:
        """Whether the integrity check finds damage (a check that cannot run, a locked file, is not damage)."""
        try:
            self._check()
            return False
        except sqlite3.DatabaseError as exc:
            return _damaged(exc)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:  # one connection, several threads (the worker's job loop and its recorder)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            self.db.execute("COMMIT")

    def _write(self, sql: str, args: Any) -> None:
        def work() -> None:
            with self._transaction():
                self.db.execute(sql, args)

        self._guarded(work)

    def forget(self, job_id: str) -> None:
        """This process no longer answers for the job (another ended it): not written again after a recovery."""
        with self._lock:
            self._mine.pop(job_id, None)

    def close(self) -> None:
        self.db.close()

    # -- jobs ---------------------------------------------------------------------------------------------
    def job_queued(self, job_id: str, workflow: dict[str, Any], session: str, previews: bool = False) -> None:
        """The durable queue: written before the job is acknowledged. A job queued again keeps its id and its
        row (created time, history); the row goes to ``session`` unless another live session holds the job
        unfinished (a client's session, when its worker accepts the job it was given), so a job never moves
        away from the process that answers for it."""
        now = time.time()

        def work() -> str:
            with self._transaction():
                held = self.db.execute("SELECT session, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                keep = (held is not None and held[1] in UNFINISHED and held[0] not in ("", session)
                        and session_alive(self.path, held[0]))
                owner = held[0] if keep else session
                self.db.execute("INSERT INTO jobs (id, created, status, workflow, session, previews) "
                                "VALUES (?, ?, 'pending', ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                                "status = 'pending', workflow = excluded.workflow, session = excluded.session, "
                                "previews = excluded.previews, finished = NULL, error = NULL",
                                (job_id, now, json.dumps(workflow), owner, int(previews)))
                return str(owner)

        owner = self._guarded(work)
        with self._lock:
            self._mine[job_id] = (now, "pending", json.dumps(workflow), owner, int(previews))

    def job_state(self, job_id: str, status: str, error: str | None = None) -> None:
        """A job's state as it changes (running, ok, error, interrupted, removed): small, written at once."""
        final = status not in UNFINISHED
        with self._lock:
            if final:
                self._mine.pop(job_id, None)
            elif job_id in self._mine:
                self._mine[job_id] = (self._mine[job_id][0], status, *self._mine[job_id][2:])
        self._write("UPDATE jobs SET status = ?, finished = CASE WHEN ? THEN ? ELSE finished END, "
                    "error = COALESCE(?, error) WHERE id = ?", (status, final, time.time(), error, job_id))

    def job_started(self, job_id: str, workflow: dict[str, Any], changes: dict[str, Any], prompt: str,
                    device: str) -> None:
        """What the history shows of a job (its changes, prompt, device); the state is job_state's."""
        self._write("INSERT INTO jobs (id, created, status, workflow, changes, prompt, device) "
                    "VALUES (?, ?, 'running', ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET changes = excluded.changes, prompt = excluded.prompt, "
                    "device = excluded.device",
                    (job_id, time.time(), json.dumps(workflow), json.dumps(changes), prompt, device))

    def left_over(self) -> list[JobRow]:
        """Jobs queued or running in a worker that is gone (a crash, a reboot, a closed terminal), oldest
        first: what can be resumed."""
        with self._lock:
            sessions = self._guarded(lambda: [r[0] for r in self.db.execute(
                "SELECT DISTINCT session FROM jobs WHERE status IN ('pending', 'running')")])
        dead = [s for s in sessions if not session_alive(self.path, s)]
        if not dead:
            return []
        marks = ",".join("?" * len(dead))
        return list(reversed(self._rows(f"SELECT * FROM jobs WHERE status IN ('pending', 'running') "
                                        f"AND session IN ({marks}) ORDER BY created DESC", dead)))

    def _rows(self, sql: str, args: list[Any]) -> list[JobRow]:
        def work() -> tuple[list[str], list[Any]]:
            cursor = self.db.execute(sql, args)
            return [d[0] for d in cursor.description], cursor.fetchall()

        with self._lock:
            names, fetched = self._guarded(work)
        rows = []
        for values in fetched:
            raw = dict(zip(names, values, strict=True))
            for key in ("workflow", "changes", "timings", "outputs", "models"):
                raw[key] = json.loads(raw[key])
            rows.append(JobRow(**raw))
        return rows

    def job_finished(self, job_id: str, status: str, *, outputs: Sequence[str] = (),
                     timings: dict[str, float] | None = None, error: str | None = None,
                     error_node: str | None = None, models: dict[str, str] | None = None,
                     seconds: float | None = None) -> None:
        self.forget(job_id)
        files = []
        for out in outputs:
            p = Path(out)
            files.append({"path": str(p), "sha256": sha256_file(p) if p.is_file() else ""})
        self._write("UPDATE jobs SET finished = ?, status = ?, outputs = ?, timings = ?, error = ?, error_node = ?, "
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
            row = self._guarded(lambda: self.db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone())
        removed: list[str] = []
        if row and delete_files:
            for out in json.loads(row[0]):
                p = Path(out["path"])
                if p.is_file():
                    p.unlink()
                    removed.append(str(p))
        self._write("DELETE FROM jobs WHERE id = ?", (job_id,))
        return removed

    # -- model hashes ---------------------------------------------------------------------------------------
    def model_hash(self, path: Path) -> str:
        """sha256 of a model file, computed once per (path, size, mtime)."""
        path = path.resolve()
        st = path.stat()
        with self._lock:
            row = self._guarded(lambda: self.db.execute(
                "SELECT size, mtime_ns, sha256 FROM model_hashes WHERE path = ?", (str(path),)).fetchone())
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        digest = sha256_file(path)
        self._write("INSERT OR REPLACE INTO model_hashes VALUES (?, ?, ?, ?)",
                    (str(path), st.st_size, st.st_mtime_ns, digest))
        return digest


def _move_aside(path: Path) -> Path:
    """Rename a damaged database to ``<name>.corrupt-<time>[-n]``, never over an earlier copy (two damaged
    files in the same second keep both), its write-ahead log with it; returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.link(path, aside)  # fails when the name is taken: an earlier copy is never replaced
        except FileExistsError:
            n += 1
            continue
        except FileNotFoundError:
            return aside  # gone already (another process moved it)
        except OSError:  # a file system without hard links
            if aside.exists():
                n += 1
                continue
            os.replace(path, aside)
            break
        path.unlink(missing_ok=True)
        break
    wal = Path(f"{path}-wal")
    if wal.exists():
        os.replace(wal, Path(f"{aside}-wal"))  # may hold the last commits: kept with its database
    Path(f"{path}-shm").unlink(missing_ok=True)
    return aside


# -- sessions: which worker holds which queued jobs ------------------------------------------------------------
def _sessions_dir(db_path: Path) -> Path:
    return db_path.parent / f"{db_path.name}.sessions"


class Session:
    """A worker's claim on the jobs it queued: an exclusive lock on a small file, held for as long as the
    process lives and released by the kernel when it dies however it dies (kill -9, a crash, a reboot).
    The file is removed when the session closes (or the process exits); files of sessions that died
    without closing are removed by the next session that starts."""

    def __init__(self, db_path: Path) -> None:
        import atexit
        import fcntl
        import uuid

        folder = _sessions_dir(db_path)
        folder.mkdir(parents=True, exist_ok=True)
        clean_sessions(folder)
        while True:
            self.id = uuid.uuid4().hex
            self.path = folder / f"{self.id}.lock"
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a cleaner may have removed the file between its creation and the lock: then take another
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd: int | None = fd
        self._pid = os.getpid()
        atexit.register(self.close)

    def close(self) -> None:
        if self._fd is None or os.getpid() != self._pid:  # closed already, or a forked child's copy
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def clean_sessions(folder: Path, min_age: float = 2.0) -> int:
    """Remove the lock files of sessions whose process is gone (killed before it could remove its own);
    how many. A file younger than ``min_age`` seconds is left: its session may be taking its lock."""
    import fcntl

    removed = 0
    try:
        names = [p for p in folder.iterdir() if p.suffix == ".lock"]
    except OSError:
        return 0
    now = time.time()
    for path in names:
        try:
            if now - path.stat().st_mtime < min_age:
                continue
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its process lives
        else:
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


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

"""Process-fault attack (run by hand; the test suite runs a few fixed rounds of it): SIGTERM or SIGKILL to the
``run`` process, to the background server or to the worker, at a random moment of a short sweep on a tiny
random-weight model.

    python -m benchmarks.attack [--rounds 12] [--seed 1] [--jobs 6] [--steps 60] [--json attack.json]

After each kill it checks the two invariants of issue 14:

* every job that was submitted is finished (its image exists), failed with a reason, or offered by ``resume``;
* no process outlives the process that started it by more than two seconds (the worker, the resource
  tracker), and a worker sent SIGTERM ends within two seconds.

Prints one line per round and a summary; exits non-zero when an invariant broke.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-sd15.safetensors"
#: how long a process may outlive its parent (and a worker a SIGTERM)
GRACE = 2.0


@dataclass
class Round:
    """What one kill did."""

    target: str
    signal: str
    delay: float
    jobs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    #: jobs neither finished with an image, failed with a reason, nor offered by resume
    lost: list[str] = field(default_factory=list)
    #: processes that outlived their parent (or a SIGTERM) by more than GRACE: (name, seconds)
    outlived: list[tuple[str, float]] = field(default_factory=list)
    #: seconds the slowest descendant took to end after its parent's (or its own) kill
    slowest_end: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.outlived


# -- a user's folder -------------------------------------------------------------------------------------------
def make_home(folder: Path, checkpoint: Path | None = None) -> Path:
    """models/checkpoints with the tiny SD1.x file (copied, or written with random weights) and workflows/."""
    target = folder / "models" / "checkpoints" / TINY
    target.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        shutil.copy(checkpoint, target)
    elif not target.exists():
        from tui_diffusion.pipeline.checkpoint_writer import write_sd1_checkpoint

        write_sd1_checkpoint(target, seed=0)
    if not (folder / "workflows").exists():
        shutil.copytree(ROOT / "workflows", folder / "workflows")
    return folder


def env_for(home: Path, runtime: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUI_DIFFUSION_DB": str(home / "history.sqlite3"),
           "TUI_DIFFUSION_MODELS_DIR": str(home / "models"), "TUI_DIFFUSION_OUTPUT_DIR": str(home / "output"),
           "PYTHONPATH": str(ROOT)}
    # one sampling thread per worker: on a busy machine torch's OpenMP threads spin against each other and a
    # 64x64 step takes seconds instead of milliseconds
    env.setdefault("OMP_NUM_THREADS", "1")
    if runtime is not None:
        env["TUI_DIFFUSION_RUNTIME_DIR"] = str(runtime)
    return env


def workflow(seed: int, steps: int) -> dict[str, Any]:
    data = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY
    data["5"]["inputs"].update(width=64, height=64)
    data["3"]["inputs"].update(seed=seed, steps=steps)
    return data


# -- processes -------------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def worker_of(pid: int) -> Any:
    """The worker process under a ``run`` or a server (not multiprocessing's resource tracker)."""
    for child in descendants(pid):
        try:
            cmd = " ".join(child.cmdline())
        except Exception:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            return child
    return None


def _gone(proc: Any) -> bool:
    import psutil

    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE  # a zombie has ended
    except psutil.Error:
        return True


def wait_gone(procs: list[Any], since: float, timeout: float) -> tuple[list[tuple[str, float]], float]:
    """Wait up to ``timeout`` seconds after ``since`` for the processes to end; those that did not (name,
    seconds waited) and the slowest end seen."""
    ended: dict[int, float] = {}
    deadline = since + timeout
    while True:
        now = time.monotonic()
        for proc in procs:
            if proc.pid not in ended and _gone(proc):
                ended[proc.pid] = now - since
        if len(ended) == len(procs) or now > deadline:
            break
        time.sleep(0.02)
    late = []
    for proc in procs:
        if proc.pid not in ended:
            try:
                name = " ".join(proc.cmdline())[-80:]
            except Exception:
                name = str(proc.pid)
            late.append((name, round(time.monotonic() - since, 2)))
            try:
                proc.kill()  # leave nothing behind for the next round
            except Exception:
                pass
    return late, max(ended.values(), default=0.0)


def kill_tree_after(pid: int, sig: int, since: float) -> tuple[list[tuple[str, float]], float]:
    """Send ``sig`` to ``pid``; wait for it and then for its descendants; who outlived it by more than GRACE."""
    import psutil

    family = descendants(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    try:
        psutil.Process(pid).wait(30)  # a server cleans up on SIGTERM: time of its own
    except (psutil.Error, subprocess.TimeoutExpired):
        pass
    died = time.monotonic()
    return wait_gone(family, died, GRACE)


# -- the invariant ---------------------------------------------------------------------------------------------
def check_store(db: Path, expected: set[str] | None = None) -> tuple[dict[str, int], list[str], list[str]]:
    """Job states in the store, the jobs that are nowhere (not finished with an image, not failed with a reason,
    not offered by resume), and the ids resume offers. ``expected``: ids that must be in the store."""
    from tui_diffusion.store.history import History

    history = History(db)
    try:
        rows = history.jobs(limit=100000)
        offered = {row.id for row in history.left_over()}
    finally:
        history.close()
    states: dict[str, int] = {}
    lost = []
    for row in rows:
        states[row.status] = states.get(row.status, 0) + 1
        if row.status == "ok":
            if not row.outputs or not all(Path(o["path"]).is_file() for o in row.outputs):
                lost.append(f"{row.id}: ok but its image is missing")
        elif row.status == "error":
            if not row.error:
                lost.append(f"{row.id}: failed without a reason")
        elif row.id not in offered:
            lost.append(f"{row.id}: {row.status} and not offered by resume")
    for job_id in sorted((expected or set()) - {row.id for row in rows}):
        lost.append(f"{job_id}: acknowledged but not in the store")
    return states, lost, sorted(offered)


def resume_lists(home: Path, ids: list[str]) -> list[str]:
    """The ids ``tui-diffusion resume --list`` does not show (it should show them all)."""
    listed = subprocess.run([sys.executable, "-m", "tui_diffusion", "resume", "--list"], cwd=home,
                            env=env_for(home), capture_output=True, text=True, timeout=120)
    return [job_id for job_id in ids if job_id not in listed.stdout]


# -- the attacks -----------------------------------------------------------------------------------------------
def _wait_line(stream: Any, text: str, timeout: float) -> tuple[bool, str]:
    """Read ``stream`` until ``text`` shows (True) or it ends or ``timeout`` passes (False); what was read."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buffer = ""
    while time.monotonic() < deadline:
        if sel.select(0.2):
            chunk = os.read(stream.fileno(), 65536).decode(errors="replace")
            if not chunk:
                return False, buffer
            buffer += chunk
            if text in buffer:
                return True, buffer
    return False, buffer


def attack_run(home: Path, target: str, sig: int, delay: float, jobs: int = 6, steps: int = 60) -> Round:
    """``tui-diffusion run`` a sweep; once its first job started, wait ``delay`` s and send ``sig`` to the run
    process (``target="run"``) or to its worker (``"worker"``)."""
    result = Round(target, signal.Signals(sig).name, round(delay, 2))
    seeds = ",".join(str(s) for s in range(1, jobs + 1))
    proc = subprocess.Popen([sys.executable, "-m", "tui_diffusion", "run", "workflows/txt2img.json", "--json",
                             "--cpu", "--set", f"4.ckpt_name={TINY}", "--set", "5.width=64", "--set", "5.height=64",
                             "--set", f"3.steps={steps}", "--sweep", f"3.seed={seeds}"], cwd=home,
                            env=env_for(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        started, said = _wait_line(proc.stderr, "job 1: started", 240)
        if not started:
            result.note = f"the first job never started: {said[-300:]!r}"
            result.lost.append(result.note)
            return result
        time.sleep(delay)
        if target == "run":
            result.outlived, result.slowest_end = kill_tree_after(proc.pid, sig, time.monotonic())
        else:
            worker = worker_of(proc.pid)
            if worker is None:
                result.note = "no worker found"
            else:
                since = time.monotonic()
                worker.send_signal(sig)
                late, result.slowest_end = wait_gone([worker], since, GRACE)
                result.outlived = [(f"worker after {result.signal}", s) for _, s in late]
            proc.wait(300)  # a new worker takes the queue; the run ends on its own
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    states, result.lost, _ = check_store(home / "history.sqlite3")
    result.states = states
    result.jobs = sum(states.values())
    return result


def attack_server(home: Path, target: str, sig: int, delay: float, jobs: int = 6, steps: int = 60) -> Round:
    """A background server with a sweep queued by a client; once the first job started, wait ``delay`` s and send
    ``sig`` to the server (``target="server"``) or to its worker (``"worker"``)."""
    from tui_diffusion import messages as m
    from tui_diffusion.server import RemoteClient, start_background

    result = Round(target, signal.Signals(sig).name, round(delay, 2))
    runtime = Path(tempfile.mkdtemp(prefix="td-"))  # short: a Unix socket's path is limited
    old = dict(os.environ)
    os.environ.update(env_for(home, runtime))
    pid = None
    try:
        pid = start_background(["--cpu"], runtime, timeout=120)
        client = RemoteClient(folder=runtime)
        client.start()
        client.wait_ready(timeout=240)
        ids = [client.submit(workflow(seed, steps)) for seed in range(1, jobs + 1)]
        queued: set[str] = set()
        started = False
        deadline = time.monotonic() + 240
        while (len(queued) < len(ids) or not started) and time.monotonic() < deadline:
            event = client.next_event(0.5)
            if isinstance(event, m.JobQueued):
                queued.add(event.job.job_id)  # the server has it in the store: acknowledged
            started = started or isinstance(event, m.JobStarted)
        time.sleep(delay)
        if target == "server":
            client.close()
            result.outlived, result.slowest_end = kill_tree_after(pid, sig, time.monotonic())
        else:
            worker = worker_of(pid)
            since = time.monotonic()
            if worker is not None:
                worker.send_signal(sig)
                late, result.slowest_end = wait_gone([worker], since, GRACE)
                result.outlived = [(f"worker after {result.signal}", s) for _, s in late]
            ends: set[str] = set()
            deadline = time.monotonic() + 300
            while ends != set(ids) and time.monotonic() < deadline:
                event = client.next_event(0.5)
                if isinstance(event, m.JobEnd):
                    ends.add(event.job_id)
            client.close()
            result.outlived += kill_tree_after(pid, signal.SIGTERM, time.monotonic())[0]
        states, result.lost, _ = check_store(home / "history.sqlite3", queued)
        result.states = states
        result.jobs = sum(states.values())
    finally:
        os.environ.clear()
        os.environ.update(old)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(runtime, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=6, help="jobs in each round's sweep")
    parser.add_argument("--steps", type=int, default=60, help="sampling steps of each job (64x64, tiny model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    attacks = [("run", attack_run, "run"), ("run", attack_run, "worker"),
               ("server", attack_server, "server"), ("server", attack_server, "worker")]
    rounds: list[Round] = []
    base = Path(tempfile.mkdtemp(prefix="td-attack-"))
    checkpoint = make_home(base / "seed").joinpath("models", "checkpoints", TINY)
    started = time.monotonic()
    try:
        for n in range(args.rounds):
            where, attack, target = attacks[n % len(attacks)]
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            delay = rng.uniform(0, 3)
            home = make_home(base / f"round-{n}", checkpoint)
            result = attack(home, target, sig, delay, args.jobs, args.steps)
            rounds.append(result)
            print(f"round {n + 1:>3}: {where:<6} {target:<6} {result.signal:<7} after {result.delay:4.2f}s: "
                  f"{'ok  ' if result.ok else 'FAIL'} jobs {result.states} slowest end {result.slowest_end:.2f}s"
                  + (f" lost {result.lost}" if result.lost else "")
                  + (f" outlived {result.outlived}" if result.outlived else "")
                  + (f" ({result.note})" if result.note else ""), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    failed = [r for r in rounds if not r.ok]
    summary = {"rounds": len(rounds), "failed": len(failed), "seconds": round(time.monotonic() - started, 1),
               "jobs": sum(r.jobs for r in rounds), "lost": sum(len(r.lost) for r in rounds),
               "outlived": sum(len(r.outlived) for r in rounds),
               "slowest_end": round(max((r.slowest_end for r in rounds), default=0.0), 2)}
    print(f"{summary['rounds']} rounds, {summary['failed']} failed; {summary['jobs']} jobs, {summary['lost']} "
          f"lost; {summary['outlived']} processes outlived their parent by over {GRACE:.0f} s (slowest end "
          f"{summary['slowest_end']} s); {summary['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": [r.__dict__ for r in rounds]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak test (not part of the test suite): many small jobs through a background server, with random
interrupts, removals, client disconnects and (optionally) worker kills.

    python -m benchmarks.soak [--jobs 500] [--kill-every 0] [--seed 1] [--json soak.json]

Checks that every job ends in exactly one final state (as the events say and as the store records it),
that every finished job's image exists, and that the worker's memory stays bounded; prints a summary and
exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FINAL = {"done", "failed", "interrupted", "removed"}


def _workflow(ckpt: str, seed: int, steps: int) -> dict[str, Any]:
    data = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = ckpt
    data["5"]["inputs"].update(width=64, height=64)
    data["3"]["inputs"].update(seed=seed, steps=steps)
    return data


def _worker_rss(server_pid: int) -> int:
    import psutil

    pid = _worker_pid(server_pid)
    try:
        return psutil.Process(pid).memory_info().rss if pid else 0
    except psutil.Error:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kill-every", type=int, default=0, help="kill -9 the worker after every N jobs (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    from tui_diffusion import messages as m
    from tui_diffusion.pipeline.checkpoint_writer import write_sd1_checkpoint
    from tui_diffusion.server import RemoteClient, start_background
    from tui_diffusion.store.history import History

    home = Path(tempfile.mkdtemp(prefix="td-soak-"))
    runtime = Path(tempfile.mkdtemp(prefix="td-"))
    write_sd1_checkpoint(home / "models" / "checkpoints" / "tiny.safetensors", seed=0)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TUI_DIFFUSION_DB": str(home / "history.sqlite3"),
                       "TUI_DIFFUSION_MODELS_DIR": str(home / "models"),
                       "TUI_DIFFUSION_OUTPUT_DIR": str(home / "output"), "TUI_DIFFUSION_RUNTIME_DIR": str(runtime)})
    server_pid = start_background(["--cpu"], runtime, timeout=120)
    start = time.monotonic()
    ends: dict[str, list[str]] = {}
    submitted: list[str] = []
    memory: list[int] = []
    kills = disconnects = cancels = 0
    client = RemoteClient(folder=runtime)
    client.start()
    client.wait_ready(timeout=120)

    def absorb(event: Any) -> None:
        if isinstance(event, m.Attached):  # after a reconnect: what ended while no client listened
            for job in event.jobs:
                if job.status in FINAL and job.job_id in submitted and not ends.get(job.job_id):
                    ends.setdefault(job.job_id, []).append(job.status)
        elif isinstance(event, m.JobFinished):
            ends.setdefault(event.job_id, []).append("done" if event.status == "ok" else "interrupted")
        elif isinstance(event, m.JobFailed):
            ends.setdefault(event.job_id, []).append("failed")
        elif isinstance(event, m.JobRemoved):
            ends.setdefault(event.job_id, []).append("removed")

    try:
        while len(submitted) < args.jobs or sum(1 for j in submitted if ends.get(j)) < len(submitted):
            if len(submitted) < args.jobs and len(submitted) - sum(1 for j in submitted if ends.get(j)) < 8:
                job = client.submit(_workflow("tiny.safetensors", rng.randrange(2**32), rng.choice([2, 3, 4, 8, 30])))
                submitted.append(job)
                roll = rng.random()
                if roll < 0.06:  # a job not ended yet: removed if it waits, interrupted if it runs
                    open_jobs = [j for j in submitted if not ends.get(j)]
                    client.cancel(open_jobs[0] if rng.random() < 0.5 else rng.choice(open_jobs))
                    cancels += 1
                elif roll < 0.08:  # the client drops and comes back
                    client.close()
                    disconnects += 1
                    client = RemoteClient(folder=runtime)
                    client.start()
                if args.kill_every and len(submitted) % args.kill_every == 0:
                    pid = _worker_pid(server_pid)
                    if pid:
                        os.kill(pid, signal.SIGKILL)  # as the out-of-memory killer would
                        kills += 1
                if len(submitted) % 50 == 0:
                    memory.append(_worker_rss(server_pid))
            event = client.next_event(timeout=0.5)
            while event is not None:
                absorb(event)
                event = client.next_event(timeout=0)
    finally:
        client.close()
        seconds = time.monotonic() - start
        stopper = RemoteClient(folder=runtime)
        try:
            stopper.start()
            stopper.stop_server()
            stopper.close()
        except Exception:
            os.kill(server_pid, signal.SIGTERM)

    deadline = time.monotonic() + 60  # the server's worker writes its last states as it stops
    while time.monotonic() < deadline and _alive(server_pid):
        time.sleep(0.1)
    rows = {r.id: r for r in History(home / "history.sqlite3").jobs(limit=args.jobs * 2)}
    twice = [j for j, e in ends.items() if len(e) != 1]
    store_final = {"ok", "error", "interrupted", "removed"}
    unfinished_in_store = [j for j in submitted if j not in rows or rows[j].status not in store_final]
    missing_images = [j for j in submitted if ends.get(j) == ["done"]
                      and not all(Path(o["path"]).is_file() for o in rows[j].outputs)]
    counts: dict[str, int] = {}
    for job in submitted:
        for state in ends.get(job, ["none"]):
            counts[state] = counts.get(state, 0) + 1
    growth = (memory[-1] - memory[0]) / memory[0] if len(memory) > 1 and memory[0] else 0.0
    result = {
        "jobs": len(submitted), "seconds": round(seconds, 1), "final_states": counts,
        "cancels_sent": cancels, "client_disconnects": disconnects, "worker_kills": kills,
        "jobs_with_not_exactly_one_end": len(twice), "jobs_unfinished_in_store": len(unfinished_in_store),
        "done_jobs_missing_images": len(missing_images),
        "unfinished_sample": [(j, rows[j].status if j in rows else None, ends.get(j)) for j in unfinished_in_store[:5]],
        "worker_rss_mb_every_50_jobs": [round(x / 2**20) for x in memory], "worker_rss_growth": round(growth, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(runtime, ignore_errors=True)
    ok = not twice and not unfinished_in_store and not missing_images and growth < 0.10
    print("soak: " + ("passed" if ok else "FAILED"), file=sys.stderr)
    return 0 if ok else 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a child that exited but is not reaped yet is not alive either
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _worker_pid(server_pid: int) -> int | None:
    """The server's live worker (a killed one may linger as a zombie until it is reaped)."""
    import psutil

    for child in psutil.Process(server_pid).children():
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:  # a zombie or gone
            continue
        if "spawn_main" in line and "resource_tracker" not in line:
            return child.pid
    return None


if __name__ == "__main__":
    raise SystemExit(main())

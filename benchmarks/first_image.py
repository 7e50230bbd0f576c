"""The first image of a fresh process: ``tui-diffusion run`` from process start to the saved PNG, by phase.

    python -m benchmarks.first_image [--models DIR] [--ckpt NAME] [--size 128] [--steps 4] [--repeat 3] [--cold]

Each run is a new ``tui-diffusion run --json`` process with an empty output folder and its own settings and
history folders. The phases come from three clocks: this process's (spawn, the "job 1: started" line on
stderr, the result line, the PNG on disk, the exit), the worker's node timings in the result line (load,
encode, sample, decode, save) and two separate measurements, each a median of its own runs: the CLI's
imports (``import tui_diffusion.cli`` less a bare interpreter) and a worker's spawn to ready. ``--cold``
first evicts the checkpoint's pages from the page cache (``posix_fadvise(DONTNEED)`` on that one file), so
the load reads it from the disk. Prints a table and writes JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the phases in the order a first image meets them, and the workflow nodes each one sums
NODE_PHASES = (("load", ("4",)), ("encode", ("6", "7")), ("sample", ("3",)), ("decode", ("8",)),
               ("save", ("9",)))


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache (the next read goes to the disk); Linux, best effort."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _workflow(ckpt: str, size: int, steps: int, seed: int) -> dict[str, Any]:
    data = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = ckpt
    data["5"]["inputs"].update(width=size, height=size)
    data["3"]["inputs"].update(steps=steps, seed=seed, cfg=7.0)
    return data


def _env(home: Path) -> dict[str, str]:
    """A user of their own: settings, history and caches in ``home``, offline."""
    return {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local" / "state"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def one_run(models: Path, ckpt: str, size: int, steps: int, seed: int, cold: bool = False) -> dict[str, float]:
    """One ``tui-diffusion run``: seconds from spawn to each mark, and the worker's node timings."""
    home = Path(tempfile.mkdtemp(prefix="td-first-"))
    workflow = home / "workflow.json"
    workflow.write_text(json.dumps(_workflow(ckpt, size, steps, seed)))
    out = home / "output"
    if cold:
        evict(models / "checkpoints" / ckpt)
    cmd = [sys.executable, "-m", "tui_diffusion", "run", str(workflow), "--json", "--models-dir", str(models),
           "--output-dir", str(out), "--cpu"]
    marks: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=home, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "started" in line and "started" not in marks:
                marks["started"] = time.perf_counter() - start
            marks.setdefault("stderr", 0.0)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith("{"):
            result = json.loads(line)
            marks["result"] = time.perf_counter() - start
    proc.wait(timeout=600)
    marks["exit"] = time.perf_counter() - start
    reader.join(timeout=5)
    saved = bool(result.get("outputs")) and (home / result["outputs"][0]).is_file()  # absolute, or under home
    shutil.rmtree(home, ignore_errors=True)
    if proc.returncode != 0 or result.get("status") != "ok" or not saved:
        raise RuntimeError(f"run failed ({proc.returncode}): {result}")
    timings = result["timings"]
    record = {"started_s": marks.get("started", float("nan")), "result_s": marks["result"], "exit_s": marks["exit"]}
    for phase, nodes in NODE_PHASES:
        record[f"{phase}_s"] = sum(float(timings.get(n, 0.0)) for n in nodes)
    return record


def imports_seconds(repeat: int) -> float:
    """``import tui_diffusion.cli`` less a bare interpreter's start, median of ``repeat``."""
    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=_env(Path(tempfile.gettempdir())))
        return time.perf_counter() - start

    bare = [timed("pass") for _ in range(repeat)]
    cli = [timed("import tui_diffusion.cli") for _ in range(repeat)]
    return statistics.median(cli) - statistics.median(bare)


def first_image(models: Path, ckpt: str, size: int = 128, steps: int = 4, repeat: int = 3,
                cold: bool = False) -> dict[str, Any]:
    """The first-image breakdown, medians over ``repeat`` fresh processes."""
    from benchmarks.startup import worker_ready_seconds

    runs = [one_run(models, ckpt, size, steps, seed, cold=cold) for seed in range(1, repeat + 1)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    imports = imports_seconds(repeat)
    ready = statistics.median(worker_ready_seconds() for _ in range(repeat))
    nodes = sum(med[f"{p}_s"] for p, _ in NODE_PHASES)
    phases = {
        "CLI imports": imports,
        "worker start (spawn to ready, measured apart)": ready,
        "CLI start, validation, spawn, submit (the rest up to job start)": max(0.0, med["started_s"] - ready),
        **{p: med[f"{p}_s"] for p, _ in NODE_PHASES},
        "engine around the nodes and the result's way back": max(0.0, med["result_s"] - med["started_s"] - nodes),
        "exit (the worker stopped, the process gone)": med["exit_s"] - med["result_s"],
    }
    return {"size": size, "steps": steps, "cold": cold, "runs": runs, "total_to_png_s": med["result_s"],
            "total_to_exit_s": med["exit_s"], "phases_s": phases, "n": repeat}


def table(fig: dict[str, Any]) -> str:
    rows = ["| phase | seconds | share |", "|---|---|---|"]
    total = fig["total_to_exit_s"]
    for name, seconds in fig["phases_s"].items():
        rows.append(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    rows.append(f"| **start to the saved PNG** | **{fig['total_to_png_s']:.2f}** | |")
    rows.append(f"| start to exit | {total:.2f} | 100% |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / ".models")
    parser.add_argument("--ckpt", default="full-sd15-fp16.safetensors")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    fig = first_image(args.models, args.ckpt, args.size, args.steps, args.repeat, args.cold)
    print(table(fig))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The first image of a fresh process: ``tui-diffusion run`` from process start to the saved PNG, by phase,
and the app (``tui-diffusion`` on a workflow) from launch to the first image shown.

    python -m benchmarks.first_image [--models DIR] [--ckpt NAME] [--size 128] [--steps 4] [--repeat 3] [--cold]
    python -m benchmarks.first_image --app [--think 0,8] [--preload on|off|both] ...   # the app, not ``run``
    python -m benchmarks.first_image --load-imports ...   # a fresh worker's first load, scipy cut on and off

Each run is a new ``tui-diffusion run --json`` process with an empty output folder and its own settings and
history folders. The phases come from three clocks: this process's (spawn, the "job 1: started" line on
stderr, the result line, the PNG on disk, the exit), the worker's node timings in the result line (load,
encode, sample, decode, save) and two separate measurements, each a median of its own runs: the CLI's
imports (``import tui_diffusion.cli`` less a bare interpreter) and a worker's spawn to ready. ``--cold``
first evicts the checkpoint's pages from the page cache (``posix_fadvise(DONTNEED)`` on that one file), so
the load reads it from the disk.

``--app``: each run is a new process running the app's own command line (``tui-diffusion WORKFLOW
--embedded``, its settings, ``run_tui``, the app with its worker) under Textual's headless driver, 120x40.
When its first frame is drawn a user's key press queues the job (ctrl+r, through Textual's key handling),
``--think`` seconds later (0: at once; a list runs each). The child process notes on the wall clock its
interpreter's start, its imports, the first frame (the worker is spawned then), the worker's ready event
reaching the app, the key, the job's start and end events reaching the app, the image drawn in the image
pane (the next refresh after it is shown) and the PNG on disk (polled every 10 ms); the worker reports its
node timings in the job's end event. Prints a table and writes JSON; asserts nothing.
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
    models = models.resolve()
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


#: the app's marks in the order a first image meets them (seconds from the launch)
APP_MARKS = ("interpreter", "imports", "first_frame", "ready", "key", "job_started", "saved", "job_finished",
             "shown", "exit")


def app_child(marks_path: str, think: float, preload: bool, argv: list[str]) -> int:
    """In the launched process: the app's command line under Textual's headless driver, a key press that
    queues the job once the first frame is drawn, and the marks written to ``marks_path`` as JSON. Without
    ``preload`` the app starts as it did before it had one: no checkpoint preloaded, no read-ahead."""
    marks: dict[str, Any] = {"interpreter": time.time()}
    import asyncio

    from tui_diffusion import app as app_module
    from tui_diffusion import cli
    from tui_diffusion import messages as m
    from tui_diffusion.app import TuiDiffusionApp
    from tui_diffusion.bridge import EngineEvent
    from tui_diffusion.widgets.image_pane import ImagePane

    marks["imports"] = time.time()
    output = Path(argv[argv.index("--output-dir") + 1])
    post, show = TuiDiffusionApp.post_to_screen, ImagePane.show_file

    def note(self: Any, message: Any) -> None:  # every event the worker sends passes here (bridge thread)
        event = getattr(message, "event", None) if isinstance(message, EngineEvent) else None
        marks.setdefault("events", []).append([type(event or message).__name__, time.time()])
        for kind, name in ((m.WorkerReady, "ready"), (m.JobStarted, "job_started"), (m.JobFinished, "job_finished"),
                           (m.JobFailed, "job_failed")):
            if isinstance(event, kind):
                marks.setdefault(name, time.time())
        if isinstance(event, m.JobFinished):
            marks["timings"], marks["status"] = dict(event.timings), event.status
        if isinstance(event, m.JobFailed):
            marks["status"], marks["error"] = "failed", event.message
        post(self, message)

    def shown(self: Any, path: Any, caption: str) -> bool:
        drawn = show(self, path, caption)
        if drawn and "shown" not in marks:
            self.app.call_after_refresh(lambda: marks.setdefault("shown", time.time()))
        return drawn

    def watch_png() -> None:
        while "exit" not in marks:
            if output.is_dir() and any(p.suffix == ".png" for p in output.rglob("*.png")):
                marks["saved"] = time.time()
                return
            time.sleep(0.01)

    async def drive(app: TuiDiffusionApp) -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            # plain sleeps, not the pilot's pauses: each of those redraws the screen, which a user's app does not
            while app.first_frame_at is None:
                await asyncio.sleep(0.005)
            marks["first_frame"] = app.first_frame_at
            await asyncio.sleep(think)
            marks["key"] = time.time()
            await pilot.press("ctrl+r")
            screen = app.main_screen
            if not screen.book.jobs:  # the app refused to queue it (its notification says why)
                marks["status"] = "failed"
                marks["error"] = "not queued: " + "; ".join(str(i) for i in screen.issues[:4])
                return
            deadline = time.time() + 900
            while not ("shown" in marks and "saved" in marks) and time.time() < deadline:
                if "job_failed" in marks or marks.get("status") not in (None, "ok"):
                    return
                await asyncio.sleep(0.01)

    def run_headless(self: TuiDiffusionApp, *args: Any, **kwargs: Any) -> Any:
        asyncio.run(drive(self))
        return None

    if not preload:
        app_module.checkpoints_of = lambda data: ()  # type: ignore[assignment]
        TuiDiffusionApp._read_ahead = lambda self: None  # type: ignore[method-assign]
    TuiDiffusionApp.post_to_screen = note  # type: ignore[method-assign]
    ImagePane.show_file = shown  # type: ignore[method-assign]
    TuiDiffusionApp.run = run_headless  # type: ignore[method-assign]
    threading.Thread(target=watch_png, daemon=True).start()
    try:
        return cli.main(argv)
    finally:
        marks["exit"] = time.time()
        marks["torch_imported"] = "torch" in sys.modules  # the app must never import it
        Path(marks_path).write_text(json.dumps(marks))


def one_app_run(models: Path, ckpt: str, size: int, steps: int, seed: int, think: float = 0.0,
                cold: bool = False, preload: bool = True) -> dict[str, Any]:
    """One launch of the app: seconds from the launch to each mark, and the worker's node timings."""
    models = models.resolve()
    home = Path(tempfile.mkdtemp(prefix="td-first-app-"))
    workflow = home / "workflow.json"
    workflow.write_text(json.dumps(_workflow(ckpt, size, steps, seed)))
    marks_path = home / "marks.json"
    if cold:
        evict(models / "checkpoints" / ckpt)
    env = {**_env(home), "XDG_RUNTIME_DIR": str(home / "run")}
    (home / "run").mkdir(mode=0o700)
    cmd = [sys.executable, "-m", "benchmarks.first_image", "--app-child", str(marks_path), "--think", str(think),
           "--preload" if preload else "--no-preload", "--", str(workflow), "--embedded", "--models-dir", str(models),
           "--output-dir", str(home / "output"), "--cpu"]
    launched = time.time()
    done = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=1200)
    marks = json.loads(marks_path.read_text()) if marks_path.is_file() else {}
    shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0 or marks.get("status") != "ok" or "shown" not in marks or "saved" not in marks:
        raise RuntimeError(f"the app's run failed ({done.returncode}): {marks.get('error') or marks}\n"
                           f"{done.stderr[-2000:]}")
    record: dict[str, Any] = {f"{k}_s": marks[k] - launched for k in APP_MARKS if k in marks}
    for phase, nodes in NODE_PHASES:
        record[f"{phase}_s"] = sum(float(marks["timings"].get(n, 0.0)) for n in nodes)
    record["think_s"] = think
    record["preload"] = preload
    record["torch_imported"] = bool(marks.get("torch_imported"))
    return record


def app_phases(med: dict[str, float]) -> dict[str, float]:
    """The app's launch to its first image, phase by phase (medians of each mark; the node phases are the
    worker's own timings, the rest of the job what the engine and the events' way back took)."""
    nodes = sum(med[f"{p}_s"] for p, _ in NODE_PHASES)
    wait_from = max(med["ready_s"], med["key_s"])
    return {
        "interpreter start": med["interpreter_s"],
        "app imports": med["imports_s"] - med["interpreter_s"],
        "app start to the first frame": med["first_frame_s"] - med["imports_s"],
        "worker start (spawned at the first frame, to its ready event)": med["ready_s"] - med["first_frame_s"],
        "the user's think time (first frame to the key; not ours)": med["key_s"] - med["first_frame_s"],
        "ready or key (the later) to the job's start event; a preload runs here": med["job_started_s"] - wait_from,
        **{p: med[f"{p}_s"] for p, _ in NODE_PHASES},
        "engine around the nodes, the end event's way to the app": med["job_finished_s"] - med["job_started_s"] - nodes,
        "image drawn (end event to the pane's next refresh)": med["shown_s"] - med["job_finished_s"],
    }


def first_image_app(models: Path, ckpt: str, size: int = 128, steps: int = 4, repeat: int = 3,
                    variants: tuple[tuple[float, bool], ...] = ((0.0, True),),
                    cold: bool = False) -> list[dict[str, Any]]:
    """The app's launch-to-first-image breakdown for each (think time, preload) variant: medians over ``repeat``
    fresh launches of each, the variants alternating launch by launch."""
    runs: dict[tuple[float, bool], list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in range(1, repeat + 1):
        for think, preload in variants:
            runs[(think, preload)].append(one_app_run(models, ckpt, size, steps, seed, think, cold, preload))
    figs = []
    for (think, preload), rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
        figs.append({"mode": "app", "size": size, "steps": steps, "cold": cold, "think_s": think, "preload": preload,
                     "runs": rows, "n": repeat, "marks_s": {k: med[f"{k}_s"] for k in APP_MARKS if f"{k}_s" in med},
                     "phases_s": app_phases(med), "total_to_png_s": med["saved_s"], "total_to_shown_s": med["shown_s"],
                     "key_to_shown_s": med["shown_s"] - med["key_s"]})
    return figs


def app_table(figs: list[dict[str, Any]]) -> str:
    """One column per think time: each phase's seconds and share of the launch to the image shown."""
    head = " | ".join(f"key {f['think_s']:g} s after the first frame, {'' if f['preload'] else 'no '}preload"
                      for f in figs)
    rows = [f"| phase | {head} |", "|---|" + "---|" * len(figs)]
    for name in figs[0]["phases_s"]:
        cells = [f"{f['phases_s'][name]:.2f} s ({100 * f['phases_s'][name] / f['total_to_shown_s']:.0f}%)"
                 for f in figs]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("| launch to the PNG on disk | " + " | ".join(f"{f['total_to_png_s']:.2f} s" for f in figs) + " |")
    rows.append("| **launch to the image shown** | " + " | ".join(f"**{f['total_to_shown_s']:.2f} s**" for f in figs)
                + " |")
    rows.append("| key to the image shown | " + " | ".join(f"{f['key_to_shown_s']:.2f} s" for f in figs) + " |")
    return "\n".join(rows) + "\n"


#: a fresh worker's first load, in a process of its own: torch and diffusers imported as a ready worker has them
_FIRST_LOAD = """
import contextlib, json, sys, tempfile, time
from pathlib import Path
import diffusers, torch
from tui_diffusion.pipeline.worker import WorkerEngine  # noqa: F401  (what a ready worker has imported)
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.models import load_checkpoint
from tui_diffusion.modelfiles import single_file
from tui_diffusion.settings import DevicePolicy
if sys.argv[2] == "off":  # as before the cut: diffusers' scheduler modules imported with scipy's statistics
    single_file._without_scipy_stats = contextlib.nullcontext
before = set(sys.modules)
start = time.perf_counter()
load_checkpoint(Path(sys.argv[1]), resolve_device(DevicePolicy("cpu")), Path(tempfile.mkdtemp()))
seconds = time.perf_counter() - start
new = set(sys.modules) - before
print(json.dumps({"load_s": seconds, "modules": len(new), "scipy_modules": sum(n.startswith("scipy") for n in new),
                  "scipy_stats": "scipy.stats" in sys.modules}))
"""


def first_load_imports(models: Path, ckpt: str, repeat: int = 3) -> dict[str, Any]:
    """A fresh worker's first load of ``ckpt`` with the scipy cut (on) and without it (off), alternating:
    seconds, and the modules the load imported."""
    rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(repeat):
        for cut in ("off", "on"):
            done = subprocess.run([sys.executable, "-c", _FIRST_LOAD, str(models.resolve() / "checkpoints" / ckpt),
                                   cut], env=_env(Path(tempfile.gettempdir())), capture_output=True, text=True,
                                  timeout=900, check=True)
            rows[cut].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {"n": repeat, "runs": rows}
    for cut, runs in rows.items():
        out[cut] = {"load_s": statistics.median(r["load_s"] for r in runs),
                    "load_range_s": [min(r["load_s"] for r in runs), max(r["load_s"] for r in runs)],
                    "modules": statistics.median(r["modules"] for r in runs),
                    "scipy_modules": statistics.median(r["scipy_modules"] for r in runs),
                    "scipy_stats": any(r["scipy_stats"] for r in runs)}
    return out


def load_imports_table(fig: dict[str, Any]) -> str:
    rows = ["| a fresh worker's first load | seconds (median, range) | modules imported | of them scipy's |",
            "|---|---|---|---|"]
    for cut, label in (("off", "before: diffusers' schedulers import scipy.stats"), ("on", "after: without it")):
        r = fig[cut]
        rows.append(f"| {label} | {r['load_s']:.2f} s ({r['load_range_s'][0]:.2f}-{r['load_range_s'][1]:.2f}) | "
                    f"{r['modules']:.0f} | {r['scipy_modules']:.0f} |")
    return "\n".join(rows) + "\n"


def machine() -> str:
    """The date and the machine, for the figures' heading (no torch import: versions from the metadata)."""
    import datetime
    import platform
    from importlib.metadata import version

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{when}. Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {version('torch')}, diffusers {version('diffusers')}, textual {version('textual')}, device cpu.")


def table(fig: dict[str, Any]) -> str:
    rows = ["| phase | seconds | share |", "|---|---|---|"]
    total = fig["total_to_exit_s"]
    for name, seconds in fig["phases_s"].items():
        rows.append(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    rows.append(f"| **start to the saved PNG** | **{fig['total_to_png_s']:.2f}** | |")
    rows.append(f"| start to exit | {total:.2f} | 100% |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--app-child":  # a launched app: --app-child MARKS --think S --[no-]preload -- ARGS
        split = argv.index("--")
        return app_child(argv[1], float(argv[3]), argv[4] == "--preload", argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / ".models")
    parser.add_argument("--ckpt", default="full-sd15-fp16.safetensors")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    parser.add_argument("--app", action="store_true", help="launch the app instead of 'tui-diffusion run'")
    parser.add_argument("--think", default="0", help="with --app: seconds from the first frame to the key, or a "
                        "comma-separated list of them (one figure each)")
    parser.add_argument("--preload", choices=("on", "off", "both"), default="on",
                        help="with --app: the app preloads the open workflow's checkpoint (on), as before it did "
                        "(off), or both, alternating")
    parser.add_argument("--load-imports", action="store_true",
                        help="only a fresh worker's first load, with and without the scipy.stats cut, alternating")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result: Any
    print(machine() + "\n")
    if args.load_imports:
        result = first_load_imports(args.models, args.ckpt, args.repeat)
        print(load_imports_table(result))
    elif args.app:
        preloads = {"on": (True,), "off": (False,), "both": (False, True)}[args.preload]
        variants = tuple((float(think), preload) for think in args.think.split(",") for preload in preloads)
        result = first_image_app(args.models, args.ckpt, args.size, args.steps, args.repeat, variants, args.cold)
        print(app_table(result))
    else:
        result = first_image(args.models, args.ckpt, args.size, args.steps, args.repeat, args.cold)
        print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

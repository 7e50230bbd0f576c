"""Start-up benchmark: launch to the TUI's first interactive frame, and worker spawn to ready.

The TUI runs in a pseudo-terminal, exits after its first frame (TUI_DIFFUSION_EXIT_AFTER_FIRST_FRAME=1)
and prints the wall-clock time of that frame; the launch time is taken just before the fork. A bare Textual
app (``benchmarks/bare_textual.py``: a header, a tree, a footer) is launched the same way, alternating with
the app, as the floor of this machine in this run: the ratio says how much of the first frame is ours.
Modules are byte-compiled as an install leaves them (one untimed launch of each first, with writing bytecode
allowed), so a ``PYTHONDONTWRITEBYTECODE`` environment does not time the compiler. Prints a markdown table
and writes JSON; asserts nothing.

    python -m benchmarks.startup [--repeat 5] [--json benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launch_env() -> dict[str, str]:
    env = {**os.environ, "TUI_DIFFUSION_EXIT_AFTER_FIRST_FRAME": "1", "TERM": "xterm-256color",
           "COLUMNS": "120", "LINES": "40"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode; a checkout writes it once
    return env


def first_frame_seconds(workflow: Path | None, timeout: float = 60.0) -> float:
    """Launch to first frame of the app on ``workflow``, or of the bare Textual app when it is None."""
    args = ["-m", "benchmarks.bare_textual"] if workflow is None else ["-m", "tui_diffusion", str(workflow)]
    launched = time.time()
    pid, fd = pty.fork()
    if pid == 0:  # child: the app, in a terminal of its own
        os.chdir(ROOT)
        os.execvpe(sys.executable, [sys.executable, *args], _launch_env())
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    match = re.search(rb"first frame at ([0-9.]+)", output)
    if not match:
        raise RuntimeError(f"no first frame reported; output ended with {output[-500:]!r}")
    return float(match.group(1)) - launched


def first_frames(workflow: Path, repeat: int) -> tuple[list[float], list[float]]:
    """The app's first frames and the bare Textual app's, alternating, after one untimed launch of each."""
    first_frame_seconds(workflow), first_frame_seconds(None)
    app: list[float] = []
    bare: list[float] = []
    for _ in range(repeat):
        app.append(first_frame_seconds(workflow))
        bare.append(first_frame_seconds(None))
    return app, bare


def worker_ready_seconds() -> float:
    from tui_diffusion.client import WorkerClient
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    client = WorkerClient(WorkerConfig(device=DevicePolicy("cpu")))
    start = time.perf_counter()
    client.start()
    try:
        client.wait_ready(timeout=120)
        return time.perf_counter() - start
    finally:
        client.close()


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    workflow = ROOT / "workflows" / "txt2img.json"
    frames, bare = first_frames(workflow, args.repeat)
    ready = [worker_ready_seconds() for _ in range(args.repeat)]
    import diffusers
    import torch

    result = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__},
        "tui_first_frame": summary(frames),
        "bare_textual_first_frame": summary(bare),
        "first_frame_over_bare": statistics.median(frames) / statistics.median(bare),
        "worker_ready_cpu": summary(ready),
    }
    print("| figure | median | min | max | runs |\n|---|---|---|---|---|")
    for name in ("tui_first_frame", "bare_textual_first_frame", "worker_ready_cpu"):
        s = result[name]
        print(f"| {name} | {s['median_s']:.3f} s | {s['min_s']:.3f} s | {s['max_s']:.3f} s | {s['n']} |")
    print(f"\nfirst frame / bare Textual app's: {result['first_frame_over_bare']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

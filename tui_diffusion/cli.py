"""The command line: ``run``, ``validate``, ``models`` and ``demo-checkpoint``.

Torch-free at import time: only ``demo-checkpoint`` imports torch in this process; ``run``
talks to the worker process through ``WorkerClient``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tui_diffusion import __version__
from tui_diffusion import messages as m
from tui_diffusion.config import BY_NAME, ConfigError, Settings, config_path, resolve
from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.values import parse_value
from tui_diffusion.graph.workflow import Workflow, WorkflowError
from tui_diffusion.paths import ModelPaths
from tui_diffusion.settings import PRECISIONS

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def _err(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)


# -- argument parsing ----------------------------------------------------------------------------------------
def _add_folders(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models folder in ComfyUI's layout (checkpoints/, loras/, vae/, embeddings/); "
                        "default ./models or $TUI_DIFFUSION_MODELS_DIR")
    p.add_argument("--extra-model-paths", type=Path, default=None, metavar="YAML",
                   help="a ComfyUI extra_model_paths.yaml: use another install's model folders too")
    p.add_argument("--input-dir", type=Path, default=None,
                   help="where LoadImage reads images; default ./input or $TUI_DIFFUSION_INPUT_DIR")
    if output:
        p.add_argument("--output-dir", type=Path, default=None,
                       help="where SaveImage writes; default ./output or $TUI_DIFFUSION_OUTPUT_DIR")


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--highvram", dest="memory", action="store_const", const="highvram",
                        help="keep every model on the GPU (the default does too)")
    memory.add_argument("--lowvram", dest="memory", action="store_const", const="lowvram",
                        help="GPUs under 3 GB: each model on the GPU only while it runs; VAE in tiles")
    memory.add_argument("--novram", dest="memory", action="store_const", const="novram",
                        help="layer-by-layer offload: slowest, least GPU memory")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="UNet and text encoder precision (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--vae-precision", choices=PRECISIONS, default=None, help="VAE precision (default: fp32)")


def settings(args: argparse.Namespace) -> Settings:
    """Options given on the command line, over the environment, the config file and the defaults."""
    options = {name: getattr(args, name, None) for name in BY_NAME}
    if getattr(args, "cpu", False):
        options["device"] = "cpu"
    return resolve(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tui-diffusion", description="Stable Diffusion node graphs in the terminal.")
    parser.add_argument("--version", action="version", version=f"tui-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a workflow headless")
    run.add_argument("workflow", type=Path, help="API-format workflow JSON")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input (repeatable)")
    run.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="NODE.INPUT=V1,V2,...",
                     help="queue one job per value, in order (repeatable: all combinations)")
    _add_folders(run)
    _add_device_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object per job on stdout, nothing else")

    val = sub.add_parser("validate", help="check a workflow without running it")
    val.add_argument("workflow", type=Path)
    val.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE")
    _add_folders(val, output=False)

    imp = sub.add_parser("import", help="convert a ComfyUI UI-format workflow (or PNG) to API format")
    imp.add_argument("source", type=Path)
    imp.add_argument("-o", "--output", type=Path, required=True)
    exp = sub.add_parser("export", help="write a workflow as a ComfyUI UI-format file ComfyUI opens")
    exp.add_argument("source", type=Path)
    exp.add_argument("-o", "--output", type=Path, required=True)

    hist = sub.add_parser("history", help="past jobs, newest first")
    hist.add_argument("--json", action="store_true", help="one JSON object per job")
    hist.add_argument("--limit", type=int, default=20)
    hist.add_argument("--search", default=None, help="only jobs whose prompts contain this text")

    conf = sub.add_parser("config", help="the effective settings and where each came from")
    conf.add_argument("--json", action="store_true")

    mod = sub.add_parser("models", help="list the checkpoints and their families")
    _add_folders(mod, output=False)
    mod.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo-checkpoint", help="write a small random-weight checkpoint to try the program with")
    demo.add_argument("--family", choices=["sd15", "sd2", "sd2-v", "sdxl"], default="sd15")
    demo.add_argument("--name", default=None, help="file name (default demo-<family>-tiny.safetensors)")
    _add_folders(demo, output=False)
    return parser


# -- --set / --sweep -----------------------------------------------------------------------------------------
def _split_assignment(text: str, wf: Workflow) -> tuple[str, str, str]:
    target, eq, value = text.partition("=")
    node_id, dot, name = target.partition(".")
    if not eq or not dot or not node_id or not name:
        raise UsageError(f"{text!r}: expected NODE.INPUT=VALUE, e.g. 3.seed=42")
    if node_id not in wf:
        raise UsageError(f"{text!r}: the workflow has no node {node_id!r} (nodes: {', '.join(wf)})")
    spec = get_spec(wf.class_type(node_id))
    if spec is not None and spec.input(name) is None:
        names = ", ".join(i.name for i in spec.inputs)
        raise UsageError(f"{text!r}: {wf.describe(node_id)} has no input {name!r} (inputs: {names})")
    return node_id, name, value


def _typed(wf: Workflow, node_id: str, name: str, text: str) -> Any:
    spec = get_spec(wf.class_type(node_id))
    try:
        return parse_value(spec.input(name) if spec else None, text)
    except ValueError as exc:
        raise UsageError(f"{wf.describe(node_id)}, input {name!r}: {exc}") from None


def apply_sets(wf: Workflow, sets: list[str]) -> None:
    for text in sets:
        node_id, name, value = _split_assignment(text, wf)
        wf.set_input(node_id, name, _typed(wf, node_id, name, value))


def expand_sweeps(wf: Workflow, sweeps: list[str]) -> list[Workflow]:
    axes = []
    for text in sweeps:
        node_id, name, values = _split_assignment(text, wf)
        axes.append([(node_id, name, _typed(wf, node_id, name, v)) for v in values.split(",")])
    jobs = []
    for combo in itertools.product(*axes):
        job = wf.copy()
        for node_id, name, value in combo:
            job.set_input(node_id, name, value)
        jobs.append(job)
    return jobs


def _load(args: argparse.Namespace) -> tuple[Workflow, ModelPaths]:
    wf = Workflow.load(args.workflow)
    apply_sets(wf, args.sets)
    return wf, settings(args).model_paths()


def _report_issues(source: Path, issues: list) -> None:
    for issue in issues:
        _err(f"{source}: {issue}")


# -- commands --------------------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    wf, models = _load(args)
    issues = validate_workflow(wf, models)
    if issues:
        _report_issues(args.workflow, issues)
        return EXIT_INVALID
    print(f"{args.workflow}: valid ({len(wf.nodes)} nodes)")
    return EXIT_OK


class _Progress:
    """One status line per job on stderr (when it is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()

    def done(self, text: str | None = None) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
        if text:
            print(text, file=sys.stderr)


def _bar(step: int, total: int, width: int = 24) -> str:
    filled = int(width * step / max(total, 1))
    return "#" * filled + "-" * (width - filled)


def cmd_run(args: argparse.Namespace) -> int:
    from tui_diffusion.client import WorkerClient, WorkerDied

    wf, models = _load(args)
    jobs = expand_sweeps(wf, args.sweeps)
    invalid = False
    for i, job in enumerate(jobs, 1):
        issues = validate_workflow(job, models)
        if issues:
            invalid = True
            if len(jobs) > 1:
                _err(f"job {i} of {len(jobs)}:")
            _report_issues(args.workflow, issues)
    if invalid:
        return EXIT_INVALID

    config = settings(args).worker_config()
    progress = _Progress(enabled=not args.json)
    client = WorkerClient(config)
    titles = {n: job.title(n) for job in jobs for n in job}
    results: dict[str, Any] = {}
    interrupted = False
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:  # second Ctrl-C: stop waiting
            raise KeyboardInterrupt
        interrupted = True
        progress.done("interrupting (Ctrl-C again to quit at once)")
        for job_id in ids:
            if job_id not in results:
                client.cancel(job_id)

    ids: list[str] = []
    running: str | None = None
    restarts = 0
    try:
        client.start()
        signal.signal(signal.SIGINT, on_sigint)
        progress.show("starting the worker...")
        ready = client.wait_ready()
        progress.done(None if args.json else
                      f"worker ready: {ready.device_name} ({ready.dtype}), torch {ready.torch_version}, "
                      f"diffusers {ready.diffusers_version}")
        ids = [client.submit(job) for job in jobs]
        by_id = dict(zip(ids, jobs, strict=True))
        index = {job_id: n for n, job_id in enumerate(ids, 1)}
        if interrupted:
            for job_id in ids:
                client.cancel(job_id)
        while len(results) < len(ids):
            try:
                event = client.next_event()
            except WorkerDied as exc:
                # the running job failed with the cause; a new worker takes the pending ones
                restarts += 1
                if running is not None and running not in results:
                    failed = m.JobFailed(running, None, f"the worker died while running it: {exc}")
                    results[running] = failed
                    _print_result(index[running], failed, args.json, progress)
                running = None
                pending = [j for j in ids if j not in results]
                if not pending:
                    break
                if restarts > 3:
                    raise
                _err(f"{exc}; restarting it for the {len(pending)} job(s) still queued")
                client.close()
                client = WorkerClient(config)
                client.start()
                client.wait_ready()
                for job_id in pending:
                    client.submit(by_id[job_id], job_id=job_id)
                continue
            if isinstance(event, m.JobStarted):
                running = event.job_id
                if args.json:  # stdout carries only the result lines; progress goes to stderr
                    print(f"job {index[event.job_id]}: started", file=sys.stderr, flush=True)
            elif isinstance(event, m.Progress):
                progress.show(f"job {index[event.job_id]}/{len(ids)} {titles.get(event.node_id, event.node_id)} "
                              f"[{_bar(event.step, event.total)}] {event.step}/{event.total}")
            elif isinstance(event, m.NodeStarted):
                progress.show(f"job {index[event.job_id]}/{len(ids)} {titles.get(event.node_id, event.node_id)}")
            elif isinstance(event, (m.JobFinished, m.JobFailed, m.JobRemoved)):
                results[event.job_id] = event
                _print_result(index[event.job_id], event, args.json, progress)
    except KeyboardInterrupt:
        progress.done("stopped")
    except WorkerDied as exc:
        progress.done()
        _err(str(exc))
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        client.close()
    if interrupted:
        return EXIT_INTERRUPTED
    ok = all(isinstance(r, m.JobFinished) and r.status == "ok" for r in results.values()) and len(results) == len(ids)
    return EXIT_OK if ok else EXIT_FAILED


def job_record(number: int, event: Any) -> dict[str, Any]:
    """The ``run --json`` line of one job."""
    if isinstance(event, m.JobFinished):
        return {"job": number, "status": event.status, "outputs": event.outputs, "executed": event.executed,
                "cached": event.cached, "timings": {k: round(v, 4) for k, v in event.timings.items()},
                "error": None}
    if isinstance(event, m.JobFailed):
        return {"job": number, "status": "error", "outputs": [], "executed": event.executed,
                "cached": event.cached, "timings": event.timings,
                "error": {"node": event.node_id, "message": event.message}}
    return {"job": number, "status": "interrupted", "outputs": [], "executed": [], "cached": [], "timings": {},
            "error": None}


def _print_result(number: int, event: Any, as_json: bool, progress: _Progress) -> None:
    if as_json:
        print(json.dumps(job_record(number, event)), flush=True)
        return
    if isinstance(event, m.JobFinished) and event.status == "ok":
        progress.done(f"job {number}: done in {event.seconds:.2f}s (ran {', '.join(event.executed) or 'nothing'}; "
                      f"cached {', '.join(event.cached) or 'nothing'})")
        for path in event.outputs:
            print(path, flush=True)
    elif isinstance(event, m.JobFailed):
        progress.done()
        _err(f"job {number}: {event.message}")
    else:
        progress.done(f"job {number}: interrupted")


def cmd_models(args: argparse.Namespace) -> int:
    from tui_diffusion.modelfiles.describe import describe_checkpoint

    models = settings(args).model_paths()
    names = models.list("checkpoints")
    rows = [describe_checkpoint(models.folder("checkpoints") / n, n) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no checkpoints in {models.folder('checkpoints')}: download one (e.g. from civitai.com) into it, "
              "or write a random-weight one with 'tui-diffusion demo-checkpoint'")
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        note = f"  ({r['error']})" if r["error"] else ""
        print(f"{r['name']:<{width}}  {r['family']}{note}")
    return EXIT_OK


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from tui_diffusion.pipeline import checkpoint_writer as w

    models = settings(args).model_paths()
    name = args.name or f"demo-{args.family}-tiny.safetensors"
    target = models.folder("checkpoints") / name
    if args.family == "sdxl":
        path = w.write_sdxl_checkpoint(target)
    elif args.family.startswith("sd2"):
        path = w.write_sd2_checkpoint(target, v_prediction=args.family == "sd2-v")
    else:
        path = w.write_sd1_checkpoint(target)
    workflow = "sdxl.json" if args.family == "sdxl" else "txt2img.json"
    print(f"wrote {path} (random weights: its images are noise)")
    print(f"try: tui-diffusion run workflows/{workflow} --set 4.ckpt_name={name} "
          "--set 5.width=64 --set 5.height=64 --set 3.steps=4")
    return EXIT_OK


def build_tui_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tui-diffusion",
        description="Open the terminal app (commands: run, validate, models, demo-checkpoint; "
                    "'tui-diffusion COMMAND --help' for each).",
    )
    parser.add_argument("--version", action="version", version=f"tui-diffusion {__version__}")
    parser.add_argument("workflow", type=Path, nargs="?", default=None,
                        help="workflow to open (default: the last one used, else workflows/txt2img.json)")
    _add_folders(parser)
    _add_device_options(parser)
    return parser


def cmd_tui(args: argparse.Namespace) -> int:
    from tui_diffusion.app import run_tui

    resolved = settings(args)
    return run_tui(args.workflow, resolved.worker_config(), resolved.values)


def cmd_import(args: argparse.Namespace) -> int:
    wf = Workflow.load(args.source)
    wf.save(args.output, "api")
    print(f"wrote {args.output} (API format, {len(wf.nodes)} nodes)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    wf = Workflow.load(args.source)
    wf.save(args.output, "ui")
    print(f"wrote {args.output} (ComfyUI UI format, {len(wf.nodes)} nodes)")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    import sqlite3

    from tui_diffusion.store.history import History, StoreError

    try:
        history = History()
        rows = history.jobs(limit=args.limit, text=args.search)
    except (StoreError, sqlite3.Error, OSError) as exc:
        _err(f"cannot read the run history: {exc}")
        return EXIT_FAILED
    if history.notice:
        _err(history.notice)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
        return EXIT_OK
    if not rows:
        print(f"no jobs recorded yet ({history.path})")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created))
        prompt = row.prompt.split("\n", 1)[0][:60]
        outputs = ", ".join(Path(o["path"]).name for o in row.outputs)
        detail = row.error or outputs
        changed = ", ".join(row.changes)[:40]
        print(f"{when}  {row.status:<11} {row.seconds or 0:6.1f}s  {prompt!r}  {changed}  {detail}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    resolved = resolve()
    if args.json:
        print(json.dumps({k: {"value": str(v) if isinstance(v, Path) else v, "from": resolved.sources[k]}
                          for k, v in resolved.values.items()}, indent=2))
        return EXIT_OK
    print(f"# config file: {config_path()}{'' if config_path().is_file() else ' (not present)'}")
    width = max(len(k) for k in resolved.values)
    for key, value in resolved.values.items():
        print(f"{key:<{width}} = {value!s:<30}  # from {resolved.sources[key]}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "config": cmd_config, "import": cmd_import, "export": cmd_export,
            "history": cmd_history, "models": cmd_models, "demo-checkpoint": cmd_demo_checkpoint}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv and argv[0] in COMMANDS:
        args = build_parser().parse_args(argv)
        command = COMMANDS[args.command]
    else:
        args = build_tui_parser().parse_args(argv)
        command = cmd_tui
    try:
        return command(args)
    except (WorkflowError, UsageError, ConfigError) as exc:
        _err(str(exc))
        return EXIT_INVALID
    except OSError as exc:
        _err(f"{exc.filename or ''}: {exc.strerror or exc}")
        return EXIT_FAILED

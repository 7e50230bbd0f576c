"""The command line: the terminal app (no command) and ``run``, ``serve``, ``resume``, ``validate``,
``history``, ``config``, ``import``, ``export``, ``models``, ``demo-checkpoint``, ``workflows``, ``doctor``.

Torch-free at import time: only ``demo-checkpoint`` imports torch in this process; ``run``, ``serve``
and the app reach the workers through the runtime's client API (``runtime.supervisor.Supervisor``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from tui_diffusion import __version__
from tui_diffusion import messages as m
from tui_diffusion.catalogue import resolve_workflow
from tui_diffusion.config import (
    BY_NAME,
    ConfigError,
    Settings,
    add_options,
    config_path,
    option_args,
    resolve,
    settings_table,
)
from tui_diffusion.graph.specs import INT, get_spec
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.values import parse_value
from tui_diffusion.graph.workflow import Workflow, WorkflowError
from tui_diffusion.paths import ModelPaths
from tui_diffusion.runtime.protocol import Backend
from tui_diffusion.runtime.supervisor import BackendFactory
from tui_diffusion.settings import WorkerConfig
from tui_diffusion.text import printable

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    pass


def _err(text: str) -> None:
    """An error on stderr; names in it (files, nodes, titles) cannot send escape sequences to the terminal."""
    print(f"error: {printable(text, keep_newlines=True)}", file=sys.stderr)


# -- argument parsing ----------------------------------------------------------------------------------------
def _add_folders(p: argparse.ArgumentParser, output: bool = True) -> None:
    """The folder settings' options (``config.SETTINGS``), with ``--output-dir`` for commands that write."""
    add_options(p, "folders", *(("output",) if output else ()))


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """The engine settings' options (device, memory, precision, limits, ...), from ``config.SETTINGS``."""
    add_options(p, "engine")


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None, metavar="all|0,1,...",
                       help="one worker process per GPU; jobs go to the free one that holds their models")
    where.add_argument("--ray", default=None, metavar="local|auto|ray://HOST:PORT",
                       help="run jobs on Ray actors, one per GPU of the cluster ('local': a throwaway cluster on "
                            "this machine); needs pip install 'tui-diffusion[ray]'")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N worker processes on the CPU (or N Ray actors with --ray)")


def backend_factory(args: argparse.Namespace) -> BackendFactory:
    """What makes the executor backend the options ask for: a pool, Ray actors, else one local worker. The
    options are checked here, before anything starts."""
    from tui_diffusion.runtime.supervisor import local_worker

    workers = getattr(args, "workers", None) or 0
    if getattr(args, "ray", None):
        from tui_diffusion.backends.ray_backend import RayUnavailable, ray_pool

        def on_ray(config: WorkerConfig) -> Backend:
            try:
                return ray_pool(config, args.ray, workers)
            except RayUnavailable as exc:
                raise UsageError(str(exc)) from None

        return on_ray
    from tui_diffusion.backends.pool import count_gpus, local_pool, parse_gpus

    if getattr(args, "gpus", None):
        try:
            gpus = parse_gpus(args.gpus, count_gpus())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return lambda config: local_pool(config, gpus=gpus)
    if workers > 1:
        return lambda config: local_pool(config, workers=workers)
    return local_worker


def settings(args: argparse.Namespace) -> Settings:
    """Options given on the command line, over the environment, the config file and the defaults."""
    return resolve({name: getattr(args, name, None) for name in BY_NAME})


WORKFLOW_HELP = ("a workflow file (ComfyUI API or UI format, or a PNG it made), or the name of a shipped workflow "
                 "such as txt2img ('tui-diffusion workflows' lists them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tui-diffusion", description="Stable Diffusion node graphs in the terminal.")
    parser.add_argument("--version", action="version", version=f"tui-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a workflow headless")
    run.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input (repeatable)")
    run.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="NODE.INPUT=V1,V2,...",
                     help="queue one job per value, in order; an integer input also takes A..B (repeatable: all "
                          f"combinations, at most {MAX_SWEEP_JOBS} jobs)")
    _add_folders(run)
    _add_device_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object per job on stdout, nothing else")
    run.add_argument("--preview", type=Path, default=None, metavar="PNG",
                     help="keep this PNG file updated with the sampling preview (at most every 250 ms; TAESD or "
                          "latent2rgb as --preview-method says), for an image viewer to watch")
    _add_backend_options(run)
    run.add_argument("--attach", action="store_true",
                     help="queue the jobs on the background server ('tui-diffusion serve') instead of a worker of "
                          "this command's own")

    serve = sub.add_parser("serve", help="run the worker and its queue as a background server clients attach to")
    what = serve.add_mutually_exclusive_group()
    what.add_argument("--background", action="store_true", help="start it off this terminal and return")
    what.add_argument("--stop", action="store_true", help="stop the running server (its worker with it)")
    what.add_argument("--status", action="store_true", help="is one running; its worker and its jobs")
    _add_folders(serve)
    _add_device_options(serve)
    _add_backend_options(serve)

    resume = sub.add_parser("resume", help="run again the jobs a worker left unfinished (a crash, a reboot)")
    resume.add_argument("--list", action="store_true", help="only list them")
    resume.add_argument("--discard", action="store_true", help="forget them")
    resume.add_argument("--json", action="store_true", help="one JSON object per job on stdout")
    _add_folders(resume)
    _add_device_options(resume)
    _add_backend_options(resume)

    val = sub.add_parser("validate", help="check a workflow without running it")
    val.add_argument("workflow", type=Path, help=WORKFLOW_HELP)
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
    shown = conf.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("--table", action="store_true",
                       help="every setting with its option, environment variable and default (the README's table)")

    mod = sub.add_parser("models", help="list the checkpoints and their families")
    _add_folders(mod, output=False)
    mod.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo-checkpoint", help="write a small random-weight checkpoint to try the program with")
    demo.add_argument("--family", choices=list(DEMO_FILES), default="sd15")
    demo.add_argument("--name", default=None, help="file name (default demo-<family>-tiny.safetensors)")
    _add_folders(demo, output=False)

    flows = sub.add_parser("workflows", help="the shipped workflows: name, model family, what each makes")
    flows.add_argument("--json", action="store_true")

    doctor = sub.add_parser("doctor", help="what this machine and its model folders can run (loads no model)")
    _add_folders(doctor, output=False)
    _add_device_options(doctor)
    doctor.add_argument("--json", action="store_true")
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


#: the most jobs one run may queue: a sweep's size is checked before a single job is built
MAX_SWEEP_JOBS = 10_000
_RANGE = re.compile(r"(-?[0-9]{1,20})\.\.(-?[0-9]{1,20})")


class Sweep(Sequence[Workflow]):
    """The jobs of a sweep, built one at a time when asked for (in ``itertools.product`` order): a large
    sweep costs memory only for the jobs being validated or submitted, never for all of them at once."""

    def __init__(self, wf: Workflow, axes: list[tuple[str, str, Sequence[Any]]]) -> None:
        self.wf, self.axes = wf, axes
        self._len = math.prod(len(values) for _, _, values in axes)

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> Workflow: ...
    @overload
    def __getitem__(self, index: slice) -> list[Workflow]: ...
    def __getitem__(self, index: int | slice) -> Workflow | list[Workflow]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if not -self._len <= index < self._len:
            raise IndexError(index)
        index %= self._len
        job = self.wf.copy()
        for node_id, name, values in reversed(self.axes):  # the last axis varies fastest, as in product()
            index, position = divmod(index, len(values))
            job.set_input(node_id, name, values[position])
        return job

    def __iter__(self) -> Iterator[Workflow]:
        return (self[i] for i in range(self._len))


def _sweep_values(wf: Workflow, node_id: str, name: str, text: str, limit: int) -> Sequence[Any]:
    """One axis: ``V1,V2,...``, where an integer input also takes ``A..B`` (inclusive, kept as a range)."""
    spec = get_spec(wf.class_type(node_id))
    ispec = spec.input(name) if spec else None
    if ispec is not None and ispec.type == INT and (match := _RANGE.fullmatch(text.strip())):
        first, last = int(match.group(1)), int(match.group(2))
        if abs(last - first) >= limit:
            raise UsageError(f"{wf.describe(node_id)}, input {name!r}: {text.strip()} is {abs(last - first) + 1} "
                             f"values, more than the {limit} jobs one run may queue")
        return range(first, last + 1) if first <= last else range(first, last - 1, -1)
    return [_typed(wf, node_id, name, v) for v in text.split(",")]


def expand_sweeps(wf: Workflow, sweeps: list[str], limit: int = MAX_SWEEP_JOBS) -> Sweep:
    """The jobs of ``--sweep`` options (all combinations), refused at once when there would be more than
    ``limit``; the jobs themselves are built lazily."""
    axes = []
    for text in sweeps:
        node_id, name, values = _split_assignment(text, wf)
        axes.append((node_id, name, _sweep_values(wf, node_id, name, values, limit)))
    size = math.prod(len(values) for _, _, values in axes)
    if size > limit:
        sizes = " x ".join(str(len(v)) for _, _, v in axes)
        raise UsageError(f"the sweep makes {sizes} = {size} jobs, more than the {limit} one run may queue; "
                         "sweep fewer values, or run it in parts")
    return Sweep(wf, axes)


def _load(args: argparse.Namespace) -> tuple[Workflow, ModelPaths]:
    wf = Workflow.load(resolve_workflow(args.workflow))
    apply_sets(wf, args.sets)
    return wf, settings(args).model_paths()


def _report_issues(source: Path | str, issues: list) -> None:
    for issue in issues:
        _err(f"{source}: {issue}")


# -- commands --------------------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    wf, models = _load(args)
    conf = settings(args)
    issues = validate_workflow(wf, models, limits=conf.limits(), allow_pickle=conf.values["allow_pickle"])
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
            sys.stderr.write("\r\033[K" + printable(text))
            sys.stderr.flush()

    def done(self, text: str | None = None) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
        if text:
            print(printable(text, keep_newlines=True), file=sys.stderr)


def _bar(step: int, total: int, width: int = 24) -> str:
    filled = int(width * step / max(total, 1))
    return "#" * filled + "-" * (width - filled)


def _write_preview(path: Path, png: bytes) -> None:
    """Replace ``path`` at once (a viewer never reads half a file); a preview that cannot be written is skipped."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(png)
        os.replace(tmp, path)
    except OSError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from tui_diffusion.runtime.protocol import WorkerDied
    from tui_diffusion.runtime.supervisor import Supervisor

    resumed = getattr(args, "resume_jobs", None)
    preview_file: Path | None = getattr(args, "preview", None)
    jobs: Sequence[Workflow]
    if resumed:
        models = settings(args).model_paths()
        jobs = [Workflow.from_data(data, f"job {job_id}") for job_id, data in resumed]
    else:
        wf, models = _load(args)
        jobs = expand_sweeps(wf, args.sweeps)
    config = settings(args).worker_config()
    invalid = False
    for i, job in enumerate(jobs, 1):
        issues = validate_workflow(job, models, limits=config.limits, allow_pickle=config.allow_pickle)
        if issues:
            invalid = True
            if len(jobs) > 1:
                _err(f"job {i} of {len(jobs)}:")
            _report_issues(f"job {resumed[i - 1][0]}" if resumed else args.workflow, issues)
    if invalid:
        return EXIT_INVALID
    if jobs and not getattr(args, "attach", False):  # the disk reads the first job's models while torch imports
        from tui_diffusion.modelfiles.readahead import hash_ahead, read_ahead, workflow_model_files

        read_ahead(workflow_model_files(jobs[0], models))
        hash_ahead(jobs[0], models, config)

    progress = _Progress(enabled=not args.json)
    if getattr(args, "attach", False):
        from tui_diffusion.server import RemoteClient

        factory: BackendFactory = RemoteClient  # the server records and supervises; losing it ends the run
    else:  # a pool or Ray, else one worker that is replaced if it dies (its running job fails with the cause)
        factory = backend_factory(args)
    client = Supervisor(config, factory)
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
    placed: dict[str, str] = {}
    default_worker = None
    try:
        client.start()
        signal.signal(signal.SIGINT, on_sigint)
        progress.show("starting the worker...")
        ready = client.wait_ready()
        progress.done(None if args.json else
                      f"worker ready: {ready.device_name} ({ready.dtype}), torch {ready.torch_version}, "
                      f"diffusers {ready.diffusers_version}")
        default_worker = f"worker 0 ({ready.device_name})"  # a pool names the worker of each job
        # the history database moved aside or unusable: said here, not only in worker.log (an attached run
        # does not repeat what the server's worker said when it started)
        for notice in (client.notice, None if getattr(args, "attach", False) else ready.notice):
            if notice:
                _err(f"warning: {notice}")
        if resumed:
            ids = [client.submit(job, job_id=job_id) for job, (job_id, _) in zip(jobs, resumed, strict=True)]
        else:
            ids = [client.submit(job, previews=preview_file is not None) for job in jobs]
        index = {job_id: n for n, job_id in enumerate(ids, 1)}
        if interrupted:
            for job_id in ids:
                client.cancel(job_id)
        while len(results) < len(ids):
            event = client.next_event()
            if isinstance(event, m.WorkerRestarted):
                _err(f"{event.reason}; a new worker took the {len(event.resubmitted)} job(s) still queued")
                continue
            if isinstance(event, m.WorkerFailed):
                raise WorkerDied(event.message)
            if isinstance(event, m.Notice):
                _err(f"warning: {event.message}")
                continue
            if getattr(event, "job_id", None) not in index:
                continue  # another client's job on a shared server, or a snapshot
            if isinstance(event, m.JobPlaced):
                placed[event.job_id] = event.worker
            elif isinstance(event, m.JobStarted):
                if args.json:  # stdout carries only the result lines; progress goes to stderr
                    print(f"job {index[event.job_id]}: started", file=sys.stderr, flush=True)
            elif isinstance(event, m.Progress):
                if preview_file is not None and event.preview_png:
                    _write_preview(preview_file, event.preview_png)
                progress.show(f"job {index[event.job_id]}/{len(ids)} {titles.get(event.node_id, event.node_id)} "
                              f"[{_bar(event.step, event.total)}] {event.step}/{event.total}")
            elif isinstance(event, m.NodeStarted):
                progress.show(f"job {index[event.job_id]}/{len(ids)} {titles.get(event.node_id, event.node_id)}")
            elif isinstance(event, (m.JobFinished, m.JobFailed, m.JobRemoved)):
                results[event.job_id] = event
                _print_result(index[event.job_id], event, args.json, progress,
                              placed.get(event.job_id, default_worker))
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


def job_record(number: int, event: Any, worker: str | None = None) -> dict[str, Any]:
    """The ``run --json`` line of one job; ``worker``: which worker or actor ran it."""
    if isinstance(event, m.JobFinished):
        record = {"job": number, "status": event.status, "outputs": event.outputs, "executed": event.executed,
                  "cached": event.cached, "timings": {k: round(v, 4) for k, v in event.timings.items()},
                  "error": None}
    elif isinstance(event, m.JobFailed):
        record = {"job": number, "status": "error", "outputs": [], "executed": event.executed,
                  "cached": event.cached, "timings": event.timings,
                  "error": {"node": event.node_id, "message": event.message}}
    else:
        record = {"job": number, "status": "interrupted", "outputs": [], "executed": [], "cached": [],
                  "timings": {}, "error": None}
    record["worker"] = worker
    return record


def _print_result(number: int, event: Any, as_json: bool, progress: _Progress, worker: str | None = None) -> None:
    if as_json:
        print(json.dumps(job_record(number, event, worker)), flush=True)
        return
    if isinstance(event, m.JobFinished) and event.status == "ok":
        progress.done(f"job {number}: done in {event.seconds:.2f}s (ran {', '.join(event.executed) or 'nothing'}; "
                      f"cached {', '.join(event.cached) or 'nothing'})")
        for path in event.outputs:
            print(printable(path), flush=True)
    elif isinstance(event, m.JobFailed):
        progress.done()
        _err(f"job {number}: {event.message}")
    else:
        progress.done(f"job {number}: interrupted")


def cmd_models(args: argparse.Namespace) -> int:
    from tui_diffusion.modelfiles.describe import describe_checkpoint

    models = settings(args).model_paths()
    names = models.list("checkpoints")
    rows = [describe_checkpoint(models.resolve("checkpoints", n), n) for n in names]  # the file the loader takes
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no checkpoints in {models.folder('checkpoints')}: download one (e.g. from civitai.com) into it, "
              "or write a random-weight one with 'tui-diffusion demo-checkpoint'")
        return EXIT_OK
    width = max(len(printable(r["name"])) for r in rows)
    for r in rows:
        note = f"  ({printable(r['error'])})" if r["error"] else ""
        print(f"{printable(r['name']):<{width}}  {printable(r['family'])}{note}")
    return EXIT_OK


#: demo-checkpoint's choices: the tiny writer (``pipeline/checkpoint_writer.py``), its arguments, and the shipped
#: workflow the hint names
DEMO_FILES: dict[str, tuple[str, dict[str, Any], str]] = {
    "sd15": ("write_sd1_checkpoint", {}, "txt2img"),
    "sd2": ("write_sd2_checkpoint", {}, "txt2img"),
    "sd2-v": ("write_sd2_checkpoint", {"v_prediction": True}, "txt2img"),
    "sdxl": ("write_sdxl_checkpoint", {}, "sdxl"),
}


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from tui_diffusion.pipeline import checkpoint_writer as w

    models = settings(args).model_paths()
    name = args.name or f"demo-{args.family}-tiny.safetensors"
    target = models.folder("checkpoints") / name
    writer, kwargs, workflow = DEMO_FILES[args.family]  # workflow: shipped, found by name from any folder
    path = getattr(w, writer)(target, **kwargs)
    print(f"wrote {path} (random weights: its images are noise)")
    where = ""  # the default ./models is found from this folder; another one is named, so the hint works anywhere
    if models.root.resolve() != Path("models").resolve():
        where = f" --models-dir {shlex.quote(str(models.root.resolve()))}"
    print(f"try: tui-diffusion run {workflow}{where} --set 4.ckpt_name={shlex.quote(name)} "
          "--set 5.width=64 --set 5.height=64 --set 3.steps=4")
    return EXIT_OK


def cmd_workflows(args: argparse.Namespace) -> int:
    """The shipped workflows, so that ``run NAME`` can be used without a checkout of the repository."""
    from tui_diffusion.catalogue import family_label, shipped_workflows, shipped_workflows_dir

    flows = shipped_workflows()
    if args.json:
        print(json.dumps([w.as_dict() for w in flows], indent=2))
        return EXIT_OK
    if not flows:
        _err(f"no shipped workflows found in {shipped_workflows_dir()} (a broken install?)")
        return EXIT_FAILED
    width = max(len(w.name) for w in flows)
    fam_width = max(len(" / ".join(family_label(f) for f in w.families)) for w in flows)
    for w in flows:
        families = " / ".join(family_label(f) for f in w.families)
        print(f"{w.name:<{width}}  {families:<{fam_width}}  {w.description}")
    print(f"\n(in {shipped_workflows_dir()}; run one by name: tui-diffusion run txt2img --set 4.ckpt_name=...)")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from tui_diffusion.doctor import diagnose, render

    report = diagnose(settings(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return EXIT_OK


def build_tui_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tui-diffusion",
        description="Open the terminal app (commands: run, validate, serve, resume, history, config, import, export, "
                    "models, demo-checkpoint, workflows, doctor; "
                    "'tui-diffusion COMMAND --help' for each).",
    )
    parser.add_argument("--version", action="version", version=f"tui-diffusion {__version__}")
    parser.add_argument("workflow", type=Path, nargs="?", default=None,
                        help="workflow to open, a file or a shipped workflow's name (default: the last one used, else "
                             "txt2img)")
    attach = parser.add_mutually_exclusive_group()
    attach.add_argument("--detach", action="store_true",
                        help="run the worker in a background server that outlives this terminal (started if none "
                             "runs) and attach to it; 'tui-diffusion' later attaches again")
    attach.add_argument("--embedded", action="store_true",
                        help="always start a worker of this app's own, even when a background server runs")
    _add_folders(parser)
    _add_device_options(parser)
    add_options(parser, "app")
    _add_backend_options(parser)
    return parser


#: the executor options a background server is started with, besides the settings
_BACKEND_OPTIONS = ("gpus", "ray", "workers")


def _server_args(args: argparse.Namespace) -> list[str]:
    """The options of this command that a background server it starts must share: its settings (derived from
    ``config.SETTINGS``) and where jobs run."""
    out = option_args(args, "folders", "output", "engine")
    for name in _BACKEND_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def cmd_tui(args: argparse.Namespace) -> int:
    from tui_diffusion.app import run_tui
    from tui_diffusion.server import RemoteClient, ServerError, server_running, start_background

    resolved = settings(args)
    factory: BackendFactory | None = None
    running = not args.embedded and server_running()
    if args.detach and not running:
        try:
            start_background(_server_args(args))
        except ServerError as exc:
            _err(str(exc))
            return EXIT_FAILED
    if args.detach or running:
        factory = RemoteClient  # closing the app detaches; the server and its queue carry on
    elif args.gpus or args.ray or (args.workers or 0) > 1:
        factory = backend_factory(args)
    return run_tui(args.workflow, resolved.worker_config(), resolved.values, client_factory=factory)


def cmd_serve(args: argparse.Namespace) -> int:
    from tui_diffusion.server import RemoteClient, Server, ServerError, server_running, socket_path, start_background

    if args.stop or args.status:
        if not server_running():
            print(f"no server runs ({socket_path()})")
            return EXIT_OK if args.stop else EXIT_FAILED
        client = RemoteClient()
        client.start()
        hello = client.attached
        assert hello is not None  # start() attached or raised
        if args.status:
            counts: dict[str, int] = {}
            for job in hello.jobs:
                counts[job.status] = counts.get(job.status, 0) + 1
            device = hello.ready.device_name if hello.ready else "starting"
            print(f"server {hello.server_pid} on {socket_path()}: worker {device}; jobs: "
                  + (", ".join(f"{n} {s}" for s, n in counts.items()) or "none"))
        else:
            client.stop_server()
            print(f"asked server {hello.server_pid} to stop")
        client.close()
        return EXIT_OK
    if args.background or not args.stop:
        if server_running():
            _err(f"a server already runs on {socket_path()} ('tui-diffusion serve --status')")
            return EXIT_FAILED
    if args.background:
        try:
            pid = start_background(_server_args(args))
        except ServerError as exc:
            _err(str(exc))
            return EXIT_FAILED
        print(f"server {pid} runs in the background on {socket_path()}; 'tui-diffusion' attaches to it")
        return EXIT_OK
    try:
        config = settings(args).worker_config()
        server = Server(config, factory=backend_factory(args))
    except ServerError as exc:
        _err(str(exc))
        return EXIT_FAILED
    print(f"serving on {server.address} (pid {os.getpid()}); stop with 'tui-diffusion serve --stop'", flush=True)
    return server.serve_forever()


def cmd_resume(args: argparse.Namespace) -> int:
    """Jobs a worker left behind (a crash, a reboot, a closed terminal): list them, or run them again."""
    import sqlite3

    from tui_diffusion.runtime.queue import REMOVED, left_over, record_state
    from tui_diffusion.store.history import StoreError

    config = settings(args).worker_config()
    try:
        left = left_over(config)
    except (StoreError, sqlite3.Error, OSError) as exc:
        _err(f"cannot read the queue store: {exc}")
        return EXIT_FAILED
    if not left:
        print("no jobs were left unfinished")
        return EXIT_OK
    for row in left:
        state = "interrupted" if row.status == "running" else "pending"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created))
        print(f"{row.id}  {when}  {state:<11}  {row.prompt.splitlines()[0][:60] if row.prompt else ''}")
    if args.list:
        return EXIT_OK
    if args.discard:
        for row in left:
            why = record_state(config, row.id, REMOVED, "discarded by the user")
            if why is not None:
                _err(f"job {row.id}: cannot record it as discarded: {why}")
                return EXIT_FAILED
        print(f"discarded {len(left)} job(s)")
        return EXIT_OK
    args.resume_jobs = [(row.id, row.workflow) for row in left]
    return cmd_run(args)


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
    if args.table:
        print(settings_table())
        return EXIT_OK
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
            "history": cmd_history, "models": cmd_models, "demo-checkpoint": cmd_demo_checkpoint, "serve": cmd_serve,
            "resume": cmd_resume, "workflows": cmd_workflows, "doctor": cmd_doctor}


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

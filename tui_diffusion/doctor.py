"""``tui-diffusion doctor``: what a user on a new machine asks first, answered without loading a model.

The device, its memory, the torch and CUDA versions and the precision and offload the defaults will use (what
the worker would pick: this imports torch, as the worker does; the TUI never calls it); the model folders in
use, extra_model_paths included, with the models in each and their family (from file headers and diffusers
configs only); and for each shipped workflow whether what is there can run it, and if not, what is missing.
Every part is gathered on its own: one that fails is reported as an error and the rest still shows.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from tui_diffusion import __version__
from tui_diffusion.catalogue import MODEL_KINDS, ShippedWorkflow, family_label, shipped_workflows, shipped_workflows_dir
from tui_diffusion.paths import MODEL_FOLDERS, PICKLE_SUFFIXES, ModelPaths

#: every model folder kind, and the input folder LoadImage reads
_KINDS = tuple(MODEL_FOLDERS)


def _guard(work: Any) -> dict[str, Any]:
    """Run one part of the report; a failure becomes ``{"error": ...}`` instead of a traceback."""
    try:
        return work()
    except Exception as exc:  # a bare or broken machine: say what failed, keep going
        return {"error": f"{type(exc).__name__}: {exc}"}


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_facts(settings: Any) -> dict[str, Any]:
    """Torch, CUDA, the device the worker would use and the defaults it would apply there."""
    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                             "cpus": os.cpu_count(), "memory_bytes": _memory_bytes()}
    try:
        import torch
    except Exception as exc:  # torch missing or broken: the worker could not start either
        facts["torch"] = None
        facts["error"] = f"torch cannot be imported ({type(exc).__name__}: {exc}); install it (see the README)"
        return facts
    facts["torch"] = torch.__version__
    facts["cuda_build"] = torch.version.cuda
    facts["cuda_available"] = bool(torch.cuda.is_available())
    gpus = []
    if facts["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpu: dict[str, Any] = {"index": i, "name": props.name, "memory_bytes": int(props.total_memory),
                                   "capability": f"{props.major}.{props.minor}"}
            try:
                free, _ = torch.cuda.mem_get_info(i)
                gpu["free_bytes"] = int(free)
            except Exception:  # a busy or restricted GPU: the total is still useful
                pass
            gpus.append(gpu)
        facts["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    facts["gpus"] = gpus
    try:  # the installed version, without importing it (seconds, and nothing here needs it)
        from importlib.metadata import version

        facts["diffusers"] = version("diffusers")
    except Exception as exc:
        facts["diffusers"] = f"not installed? ({exc})"
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.settings import DevicePolicy

    v = settings.values  # not worker_config(): a broken extra_model_paths.yaml must not hide the device
    policy = DevicePolicy(v["device"], memory=v["memory"], precision=v["precision"],
                          vae_precision=v["vae_precision"], compile=bool(v["compile"]))
    device = resolve_device(policy)
    facts["device"] = {"device": str(device.torch_device), "name": device.name,
                       "precision": str(device.dtype).removeprefix("torch."),
                       "vae_precision": str(device.vae_dtype).removeprefix("torch."),
                       "offload": device.offload, "vae_tiling": device.vae_tiling, "memory_mode": policy.memory,
                       "compile": device.compile}
    return facts


def checkpoint_family(path: Path) -> dict[str, Any]:
    """Family id and label of a checkpoint file or diffusers folder, from headers and configs only."""
    from tui_diffusion.modelfiles.header import CheckpointError

    try:
        if path.is_dir():
            from tui_diffusion.modelfiles.diffusers_folder import diffusers_folder_family

            info = diffusers_folder_family(path)
            return {"family": info.family, "label": f"{info.label} (diffusers folder)"}
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return {"family": None, "label": "pickle file (not inspected; loaded only with --allow-pickle)"}
        from tui_diffusion.families import detect
        from tui_diffusion.modelfiles.header import read_header

        family = detect(read_header(path))
        row: dict[str, Any] = {"family": family.id if family.supported else None, "label": family.label}
        if not family.supported:
            row["error"] = getattr(family, "reason", "not supported")
        return row
    except (CheckpointError, OSError, ValueError, RecursionError) as exc:
        return {"family": None, "label": "unreadable", "error": str(exc)}


def model_folders(paths: ModelPaths) -> dict[str, Any]:
    """Each kind's folders (the models folder first, then extra_model_paths) and what is in each."""
    out: dict[str, Any] = {}
    for kind in _KINDS:
        folders = []
        for folder in paths.folders(kind):
            names = paths.list_folder(kind, folder)
            entry: dict[str, Any] = {"folder": str(folder), "exists": folder.is_dir(), "files": []}
            for name in names:
                row: dict[str, Any] = {"name": name}
                if kind in MODEL_KINDS:
                    row.update(checkpoint_family(folder / name))
                entry["files"].append(row)
            folders.append(entry)
        out[kind] = folders
    return out


#: what a loader of each folder needs, in words
_WANTED = {"checkpoints": "a checkpoint", "diffusion_models": "a diffusion model", "text_encoders": "a text encoder",
           "loras": "a LoRA", "vae": "a VAE", "embeddings": "an embedding", "input": "an image",
           "upscale_models": "an upscale model", "controlnet": "a ControlNet"}


def _first(rows: list[dict[str, Any]]) -> str | None:
    return rows[0]["name"] if rows else None


def workflow_readiness(flow: ShippedWorkflow, folders: dict[str, Any]) -> dict[str, Any]:
    """Whether the models and images found can run ``flow``; the ``--set`` that would use them, or what is
    missing."""
    sets: list[str] = []
    missing: list[str] = []
    for need in flow.requirements:
        files = [f for entry in folders.get(need.kind, []) for f in entry["files"]]
        if need.families:
            fitting = [f for f in files if f.get("family") in need.families]
            wanted = " or ".join(family_label(f) for f in need.families)
        else:
            fitting, wanted = files, _WANTED.get(need.kind, "a file")
        name = _first(fitting)
        if name is None:
            where = folders.get(need.kind, [{}])[0].get("folder", need.kind)
            missing.append(f"node {need.node_id} {need.title!r}, input {need.input!r}: {wanted} in {where}")
        else:
            sets.append(f"{need.node_id}.{need.input}={name}")
    return {"name": flow.name, "families": list(flow.families), "can_run": not missing, "missing": missing,
            "set": sets}


def diagnose(settings: Any) -> dict[str, Any]:
    """The whole report as plain data (``doctor --json`` prints it as it is)."""
    report: dict[str, Any] = {"tui_diffusion": __version__, "executable": sys.executable,
                              "shipped_workflows": str(shipped_workflows_dir())}
    report["worker"] = _guard(lambda: device_facts(settings))
    paths: ModelPaths | None = None
    try:
        paths = settings.model_paths()
        report["models_dir"] = str(paths.root)
        report["extra_model_paths"] = [[kind, str(folder)] for kind, folder in paths.extra]
    except Exception as exc:  # e.g. an unreadable extra_model_paths.yaml
        report["models_dir"] = {"error": str(exc)}
    folders = _guard(lambda: model_folders(paths)) if paths is not None else {"error": "no model folders"}
    report["folders"] = folders
    flows: list[dict[str, Any]] = []
    for flow in shipped_workflows():
        flows.append(_guard(lambda flow=flow: workflow_readiness(flow, folders if "error" not in folders else {}))
                     | {"name": flow.name})
    report["workflows"] = flows
    return report


def _size(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "unknown"


def render(report: dict[str, Any]) -> str:
    """The report as a few readable sections."""
    lines = [f"tui-diffusion {report['tui_diffusion']} ({report['executable']})", ""]
    w = report["worker"]
    lines.append("Worker")
    if "error" in w and "torch" not in w:
        lines.append(f"  error: {w['error']}")
    else:
        lines.append(f"  python {w['python']} on {w['platform']}; {w['cpus']} CPUs, {_size(w['memory_bytes'])} memory")
        if w.get("torch") is None:
            lines.append(f"  torch: {w.get('error')}")
        else:
            lines.append(f"  torch {w['torch']} (CUDA build: {w['cuda_build'] or 'none'}), "
                         f"diffusers {w.get('diffusers')}; CUDA available: {'yes' if w['cuda_available'] else 'no'}")
            for gpu in w.get("gpus", []):
                free = f", {_size(gpu['free_bytes'])} free" if "free_bytes" in gpu else ""
                lines.append(f"  GPU {gpu['index']}: {gpu['name']}, {_size(gpu['memory_bytes'])}{free}, "
                             f"compute capability {gpu['capability']}")
            d = w.get("device")
            if d:
                offload = {"none": "none (models stay on the device)", "model": "each model on the GPU only while "
                           "it runs (lowvram)", "sequential": "layer by layer (novram)"}.get(d["offload"], d["offload"])
                lines.append(f"  the worker will use: {d['name']} ({d['device']}), {d['precision']} (VAE "
                             f"{d['vae_precision']}), offload: {offload}"
                             + (", VAE in tiles" if d["vae_tiling"] else "") + (", --compile" if d["compile"] else ""))
            elif "error" in w:
                lines.append(f"  error: {w['error']}")
    lines += ["", f"Model folders (models: {report['models_dir']})"]
    for kind, folder in report.get("extra_model_paths", []):
        lines.append(f"  extra_model_paths: {kind} in {folder}")
    folders = report["folders"]
    if "error" in folders:
        lines.append(f"  error: {folders['error']}")
    else:
        for kind, entries in folders.items():
            for entry in entries:
                state = f"{len(entry['files'])} file(s)" if entry["exists"] else "missing"
                lines.append(f"  {kind:<11} {entry['folder']}: {state}")
                for f in entry["files"][:20]:
                    label = f"  {f['label']}" if "label" in f else ""
                    note = f"  ({f['error']})" if f.get("error") else ""
                    lines.append(f"      {f['name']}{label}{note}")
                if len(entry["files"]) > 20:
                    lines.append(f"      ... and {len(entry['files']) - 20} more")
    lines += ["", f"Shipped workflows ({report['shipped_workflows']})"]
    for flow in report["workflows"]:
        if "error" in flow:
            lines.append(f"  {flow['name']}: error: {flow['error']}")
        elif flow["can_run"]:
            sets = " ".join(f"--set {s}" for s in flow["set"])
            lines.append(f"  {flow['name']}: can run: tui-diffusion run {flow['name']} {sets}".rstrip())
        else:
            lines.append(f"  {flow['name']}: missing " + "; ".join(flow["missing"]))
    return "\n".join(lines)


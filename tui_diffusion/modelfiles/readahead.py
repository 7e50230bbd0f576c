"""Read a job's model files into the page cache ahead of their load, while something else runs.

A fresh ``tui-diffusion run`` spends seconds starting its worker (torch, diffusers) before the first node
runs; a checkpoint that is not in the page cache yet (the first image after a boot, a new download) can be
read from the disk in that time instead of after it. ``posix_fadvise(WILLNEED)`` asks the kernel to read a
file in the background; it is only a hint: it costs the caller nothing, changes nothing when the pages are
there already, and is skipped where the platform has no such call. Torch-free (the CLI calls it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: the model folders whose files a job loads whole (a read-ahead of them is worth it)
KINDS = ("checkpoints", "vae", "loras", "controlnet", "unet", "diffusion_models", "clip", "text_encoders")


def read_ahead(paths: Iterable[Path]) -> threading.Thread | None:
    """Ask the kernel to read these files into the page cache, from a daemon thread (the hint may block while
    it queues the reads); returns the thread, or None where there is nothing to do."""
    files = [p for p in paths if p.is_file()]
    if not files or not hasattr(os, "posix_fadvise"):
        return None
    thread = threading.Thread(target=_advise, args=(files,), name="read-ahead", daemon=True)
    thread.start()
    return thread


def _advise(files: list[Path]) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def workflow_model_files(workflow: Any, models: Any, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """The model files a workflow's nodes name (inputs whose choices are one of ``kinds``' folders' files),
    resolved in ``models`` (``paths.ModelPaths``); names that do not resolve are left out (validation reports
    them)."""
    from tui_diffusion.graph.specs import get_spec

    found: list[Path] = []
    for node_id in workflow:
        spec = get_spec(workflow.class_type(node_id))
        if spec is None:
            continue
        for name, value in workflow.nodes[node_id].get("inputs", {}).items():
            entry = spec.input(name)
            if entry is None or entry.choices_from not in kinds or not isinstance(value, str):
                continue
            try:
                path = models.resolve(entry.choices_from, value)
            except Exception:  # PathError and any odd name: validation says what is wrong with it
                continue
            if path not in found:
                found.append(path)
    return found


#: the node types whose images carry A1111's parameters, which name the checkpoint's sha256
SAVING_NODES = frozenset({"SaveImage"})


def hash_ahead(workflow: Any, models: Any, config: Any) -> threading.Thread | None:
    """Hash the checkpoints of a workflow that saves images into the run history's table of model hashes, from
    a daemon thread, while the worker imports torch: the first saved image of a checkpoint names its sha256
    (seconds for a 2 GB file), and the worker finds it there instead of hashing during the save. Nothing is
    done when history is off or the workflow saves nothing; a failure only leaves the hash to the worker."""
    if not getattr(config, "record_history", False):
        return None
    if not any(workflow.class_type(n) in SAVING_NODES for n in workflow):
        return None
    files = [p for p in workflow_model_files(workflow, models, ("checkpoints",)) if p.is_file()]
    if not files:
        return None
    thread = threading.Thread(target=_hash, args=(files, config), name="hash-ahead", daemon=True)
    thread.start()
    return thread


def _hash(files: list[Path], config: Any) -> None:
    from tui_diffusion.store.history import History

    try:  # a damaged database is left to the worker, which moves it aside and tells the user
        history = History(config.db_path, recover=False)
    except Exception:  # noqa: BLE001  (the history is a record: the worker says what is wrong with it)
        return
    try:
        for path in files:
            history.model_hash(path)
    except Exception:  # noqa: BLE001  (a file replaced meanwhile, a locked database: the worker hashes it)
        pass
    finally:
        history.close()

"""What happens when UI code raises: the workflow is kept, the traceback goes to a log file, and the user is
told where both are, instead of a traceback drawn over the terminal."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from tui_diffusion.state import save_recovery, state_file


def crash_log_dir() -> Path:
    """Crash logs live next to the app's state (the recovery folder's sibling)."""
    return state_file().parent / "logs"


def write_crash_log(error: BaseException) -> Path | None:
    """The full traceback in a new file; None when the folder cannot be written."""
    folder = crash_log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 1000:03d}.log"
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        path.write_text(text, encoding="utf-8")
    except OSError:
        return None
    return path


def crash_report(document: Any, error: BaseException) -> str:
    """Keep the edits (a recovery file when unsaved), log the traceback, and return what to tell the user."""
    log = write_crash_log(error)
    where = None
    if document is not None:
        try:
            if document.dirty:
                where = save_recovery(document.name, document.workflow.to_data())
            elif document.path is not None:
                where = document.path
        except Exception:  # the document itself may be what broke: still report the log
            where = None
    lines = [f"tui-diffusion stopped on an internal error: {type(error).__name__}: {error}"]
    if where is not None:
        lines.append(f"Your workflow is kept in {where}" + (" (the next start says so too)."
                                                               if document is not None and document.dirty else "."))
    lines.append(f"The details are in {log}; please include that file in a bug report." if log else
                 "The details could not be written to a log file.")
    return "\n".join(lines)

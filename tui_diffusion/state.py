"""What the app remembers between runs (the last workflow opened), in the user's state folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

STATE_DIR_ENV = "TUI_DIFFUSION_STATE_DIR"


def state_file() -> Path:
    base = os.environ.get(STATE_DIR_ENV) or platformdirs.user_state_dir("tui-diffusion")
    return Path(base) / "state.json"


def load_state() -> dict:
    try:
        data = json.loads(state_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(data: dict) -> None:
    path = state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # remembering is a convenience; never fail the app for it


def save_recovery(name: str, data: dict) -> Path | None:
    """Unsaved edits kept when the terminal goes away (SIGHUP); the next start says where they are."""
    import time

    folder = state_file().parent / "recovered"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{Path(name).stem or 'workflow'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return None
    state = load_state()
    state["recovered"] = str(path)
    save_state(state)
    return path

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

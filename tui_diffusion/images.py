"""Drawing images in the terminal with term-image: half-blocks inside the app, the best protocol
the terminal offers for the full-size view. Torch-free."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from functools import cache
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Pillow (and numpy under it) loads with the first image, not with the app
    from PIL import Image


@cache
def _term_image() -> ModuleType:
    """term-image, imported on first use (it is slow to import: not on the start-up path)."""
    warnings.filterwarnings("ignore", message="It seems this process is not running within a terminal")
    import term_image
    import term_image.image

    # Inside the app Textual owns the terminal: term-image must not query it.
    term_image.disable_queries()
    term_image.set_cell_ratio(0.5)
    return term_image


def open_image(source: str | Path | bytes) -> Image.Image:
    from PIL import Image

    if isinstance(source, bytes):
        return Image.open(BytesIO(source)).convert("RGB")
    with Image.open(source) as im:
        return im.convert("RGB")


def halfblock_ansi(image: Image.Image, columns: int, rows: int) -> str:
    """The image fitted into columns x rows cells, two pixels per cell, in true colour."""
    from PIL import Image

    columns, rows = max(columns, 1), max(rows, 1)
    w, h = image.size
    scale = min(columns / w, (rows * 2) / h)
    target = (max(1, round(w * scale)), max(2, round(h * scale)))
    block = _term_image().image.BlockImage(image.resize(target, Image.BOX))  # area average: no ringing at edges
    block.set_size(width=target[0])
    return format(block, "1.1")


def tmux_passthrough_allowed() -> bool:
    """Whether tmux forwards graphics escape sequences (``allow-passthrough on``)."""
    if not os.environ.get("TMUX") or not shutil.which("tmux"):
        return False
    try:
        out = subprocess.run(["tmux", "show", "-Apv", "allow-passthrough"], capture_output=True, text=True,
                             timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.strip() in ("on", "all") for line in out.splitlines())


def full_view_class() -> type:
    """The term-image class for the full-size view in this terminal."""
    ti = _term_image()
    if os.environ.get("TMUX") and not tmux_passthrough_allowed():
        return ti.image.BlockImage  # graphics would be swallowed by tmux: blocks always show
    ti.enable_queries()
    try:
        return ti.image.auto_image_class()
    finally:
        ti.disable_queries()


def show_full(path: str | Path) -> None:
    """Draw the image as large as the terminal allows, then wait for a key (the app is suspended)."""
    cls = full_view_class()
    image = cls(open_image(path))
    cols, lines = shutil.get_terminal_size()
    image.set_size(frame_size=(cols, max(lines - 2, 1)))
    sys.stdout.write("\x1b[2J\x1b[H")
    sys.stdout.flush()
    image.draw(h_align="center", v_align="top", pad_height=1)
    sys.stdout.write(f"\n{Path(path).name}  {cls.__name__.replace('Image', '')} — press any key to return")
    sys.stdout.flush()
    _wait_key()


def _wait_key() -> None:
    try:
        import termios
        import tty
    except ImportError:  # Windows
        input()
        return
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        os.read(fd, 32)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)

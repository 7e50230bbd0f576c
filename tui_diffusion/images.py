"""Drawing images in the terminal with term-image: half-blocks inside the app, the best protocol
the terminal offers for the full-size view. Torch-free."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
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


#: the most pixels an image may have to be decoded here (a 60000x60000 PNG of 437 KB would take gigabytes)
MAX_PIXELS = 8192 * 8192
#: the most bytes one PNG text chunk may hold, and all of them together, once decompressed
MAX_TEXT_CHUNK = 32 * 1024 * 1024
MAX_TEXT_TOTAL = 64 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageFileError(ValueError):
    """An image file that cannot be read safely; the message says why (the caller names the file)."""


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image as RGB; its size is checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(source) if isinstance(source, bytes) else source)
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageFileError(f"{width}x{height} pixels is more than the {max_pixels} this program decodes")
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"too many pixels to decode ({exc})") from None
    except (UnidentifiedImageError, SyntaxError, struct.error, zlib.error) as exc:
        raise ImageFileError(f"not a readable image ({exc})") from None


def _inflate(data: bytes, budget: int) -> bytes:
    """zlib data, refusing to grow past ``budget`` bytes (a compressed text chunk can be a zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, budget)
    except zlib.error as exc:
        raise ImageFileError(f"a damaged compressed text chunk ({exc})") from None
    if inflater.unconsumed_tail:
        raise ImageFileError(f"a text chunk holds more than {budget} bytes once decompressed")
    return out


def png_text_chunks(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, read without decoding a single pixel: what a workflow
    loader needs, safe against decompression bombs in the pixels and in the text."""
    total = 0
    chunks: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ImageFileError("not a PNG file")
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ImageFileError("truncated (no IEND chunk)")
            length, kind = struct.unpack(">I4s", head)
            if length > 0x7FFFFFFF:
                raise ImageFileError(f"a chunk claims {length} bytes")
            if kind == b"IEND":
                return chunks
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                f.seek(length + 4, os.SEEK_CUR)  # pixels and everything else: skipped, never decoded
                continue
            if length > MAX_TEXT_CHUNK:
                raise ImageFileError(f"a {kind.decode()} chunk of {length} bytes is larger than {MAX_TEXT_CHUNK}")
            data, crc = f.read(length), f.read(4)
            if len(data) < length or len(crc) < 4:
                raise ImageFileError(f"truncated in a {kind.decode()} chunk")
            if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
                raise ImageFileError(f"a {kind.decode()} chunk fails its checksum")
            key, sep, rest = data.partition(b"\0")
            if not sep:
                raise ImageFileError(f"a {kind.decode()} chunk without a keyword")
            budget = min(MAX_TEXT_CHUNK, MAX_TEXT_TOTAL - total)
            if kind == b"tEXt":
                text = rest.decode("latin-1")
            elif kind == b"zTXt":
                text = _inflate(rest[1:], budget).decode("latin-1")
            else:
                if len(rest) < 2:
                    raise ImageFileError("a damaged iTXt chunk")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, raw = rest.partition(b"\0")
                text = (_inflate(raw, budget) if compressed else raw).decode("utf-8", errors="replace")
            total += len(text)
            if total > MAX_TEXT_TOTAL:
                raise ImageFileError(f"its text chunks hold more than {MAX_TEXT_TOTAL} bytes")
            chunks[key.decode("latin-1")] = text


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

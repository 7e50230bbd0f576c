"""Saving images the way ComfyUI names them, atomically and without ever overwriting.

Torch-free (Pillow only): the worker calls it with PIL images.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tui_diffusion.paths import PathError, inside


def split_prefix(output_dir: Path, filename_prefix: str) -> tuple[Path, str]:
    """The folder and file-name stem for a ComfyUI ``filename_prefix`` (which may hold sub-folders)."""
    if not filename_prefix.strip():
        raise PathError("filename_prefix is empty")
    folder_part, _, stem = filename_prefix.replace("\\", "/").rpartition("/")
    if not stem:
        raise PathError(f"filename_prefix {filename_prefix!r} ends with a folder separator")
    folder = inside(output_dir, folder_part) if folder_part else output_dir.resolve()
    return folder, stem


def next_counter(folder: Path, stem: str) -> int:
    """One past the highest counter of ``<stem>_NNNNN_.png`` files in the folder."""
    rx = re.compile(re.escape(stem) + r"_(\d+)_\.png")
    found = [int(m.group(1)) for name in os.listdir(folder) if (m := rx.fullmatch(name))] if folder.is_dir() else []
    return max(found, default=0) + 1


def png_info(text_chunks: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return info


def save_png(image: Image.Image, output_dir: Path, filename_prefix: str, text_chunks: dict[str, Any]) -> Path:
    """Write ``<prefix>_<counter:05>_.png`` with the text chunks; returns the final path.

    The file is written under a temporary name and linked to its final name, which fails rather
    than overwrite when another writer took that name first; then the counter moves on.
    """
    folder, stem = split_prefix(output_dir, filename_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp.png"
    try:
        image.save(tmp, format="PNG", pnginfo=png_info(text_chunks), compress_level=4)
        counter = next_counter(folder, stem)
        while True:
            final = folder / f"{stem}_{counter:05}_.png"
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                counter += 1
            except OSError:  # file systems without hard links
                if final.exists():
                    counter += 1
                    continue
                os.rename(tmp, final)
                break
        return final
    finally:
        tmp.unlink(missing_ok=True)


def store_bytes(folder: Path, name: str, data: bytes) -> Path:
    """An image fetched from another machine: written atomically under its own name, or ``<stem>-<n><ext>``
    when that name is taken here; never overwrites."""
    folder.mkdir(parents=True, exist_ok=True)
    safe = Path(name).name
    tmp = folder / f".{safe}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        stem, ext = os.path.splitext(safe)
        n = 0
        while True:
            final = folder / (safe if n == 0 else f"{stem}-{n}{ext}")
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink(missing_ok=True)

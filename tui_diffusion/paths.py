"""Where models, outputs and temporary files live, and safe name resolution inside them.

One place for the folder layout (ComfyUI's: ``models/checkpoints``, ``models/loras``, ...), the
defaults and the environment variables that override them. Torch-free.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "TUI_DIFFUSION_MODELS_DIR"
OUTPUT_DIR_ENV = "TUI_DIFFUSION_OUTPUT_DIR"
INPUT_DIR_ENV = "TUI_DIFFUSION_INPUT_DIR"

#: model folder kind -> file suffixes listed in it
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "loras": (".safetensors",),
    "vae": (".safetensors",),
    "embeddings": (".safetensors", ".pt", ".bin"),
    "input": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class PathError(ValueError):
    """A name that does not resolve to a file inside its folder."""


def default_models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or "models")


def default_output_dir() -> Path:
    return Path(os.environ.get(OUTPUT_DIR_ENV) or "output")


def default_input_dir() -> Path:
    return Path(os.environ.get(INPUT_DIR_ENV) or "input")


def default_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / "tui-diffusion"


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def inside(folder: Path, name: str) -> Path:
    """Resolve ``name`` inside ``folder``; refuse absolute names and anything escaping it."""
    if not name or os.path.isabs(name) or "\\" in name:
        raise PathError(f"{name!r} is not a relative name inside {folder}")
    base = folder.resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise PathError(f"{name!r} points outside {folder}")
    return target


@dataclass(frozen=True)
class ModelPaths:
    """The models folder of one run (and the input folder that LoadImage reads), plus the folders of other
    installs (ComfyUI's extra_model_paths.yaml) searched after it."""

    root: Path
    input_dir: Path | None = None
    #: (kind, folder) pairs searched after root/kind
    extra: tuple[tuple[str, Path], ...] = ()

    def folder(self, kind: str) -> Path:
        if kind == "input":
            return self.input_dir if self.input_dir is not None else default_input_dir()
        return self.root / kind

    def folders(self, kind: str) -> list[Path]:
        return [self.folder(kind)] + [folder for k, folder in self.extra if k == kind]

    def list(self, kind: str) -> list[str]:
        """File names (relative, with sub-folders) in the model folders; diffusers folders for checkpoints."""
        names: list[str] = []
        for folder in self.folders(kind):
            names.extend(n for n in self._list_one(kind, folder) if n not in names)
        return sorted(names, key=str.lower)

    def _list_one(self, kind: str, folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        suffixes = MODEL_FOLDERS.get(kind, (".safetensors",))
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            here = Path(dirpath)
            if kind == "checkpoints":
                for d in list(dirnames):
                    if is_diffusers_folder(here / d):
                        names.append((here / d).relative_to(folder).as_posix())
                        dirnames.remove(d)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names.extend(
                (here / f).relative_to(folder).as_posix()
                for f in filenames
                if f.lower().endswith(suffixes) and not f.startswith(".")
            )
        return names

    def resolve(self, kind: str, name: str) -> Path:
        """The path of ``name`` in the folders of ``kind``; PathError when it is in none of them."""
        folders = self.folders(kind)
        for folder in folders:
            path = inside(folder, name)
            if path.exists():
                return path
        where = " or ".join(str(f) for f in folders)
        raise PathError(f"{name!r} not found in {where}")

    def fingerprint(self, kind: str, name: str) -> list[object]:
        """Size and mtime of a model file (or of a diffusers folder's files): part of cache keys."""
        path = self.resolve(kind, name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out: list[object] = [str(path)]
        for f in files:
            st = f.stat()
            out += [f.name, st.st_size, st.st_mtime_ns]
        return out


# ComfyUI's folder names in extra_model_paths.yaml, mapped to ours.
_EXTRA_KINDS = {"checkpoints": "checkpoints", "loras": "loras", "vae": "vae", "embeddings": "embeddings"}


def read_extra_model_paths(path: Path) -> tuple[tuple[str, Path], ...]:
    """The folders of a ComfyUI ``extra_model_paths.yaml`` (its ``comfyui:`` and ``a111:`` sections alike).

    Raises PathError naming the file when it cannot be read.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PathError(f"{path}: cannot read it as ComfyUI's extra_model_paths.yaml: {exc}") from None
    if not isinstance(data, dict):
        raise PathError(f"{path}: not an extra_model_paths.yaml (expected sections such as 'comfyui:')")
    out: list[tuple[str, Path]] = []
    for section in data.values():
        if not isinstance(section, dict):
            continue
        base = Path(os.path.expanduser(str(section.get("base_path", ""))))
        if not base.is_absolute():
            base = path.parent / base
        for key, value in section.items():
            kind = _EXTRA_KINDS.get(key)
            if kind is None or not isinstance(value, str):
                continue
            for line in value.splitlines():
                if line.strip():
                    folder = Path(os.path.expanduser(line.strip()))
                    out.append((kind, folder if folder.is_absolute() else base / folder))
    return tuple(out)

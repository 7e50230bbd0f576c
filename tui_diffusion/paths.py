"""Where models, outputs and temporary files live, and safe name resolution inside them.

One place for the folder layout (ComfyUI's: ``models/checkpoints``, ``models/loras``, ...), the
defaults and the environment variables that override them. Torch-free.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "TUI_DIFFUSION_MODELS_DIR"
OUTPUT_DIR_ENV = "TUI_DIFFUSION_OUTPUT_DIR"
INPUT_DIR_ENV = "TUI_DIFFUSION_INPUT_DIR"

#: model folder kind -> file suffixes listed in it
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "loras": (".safetensors",),
    "vae": (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
    "diffusion_models": (".safetensors", ".sft"),
    "text_encoders": (".safetensors",),
    "embeddings": (".safetensors", ".pt", ".bin"),
    "input": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    # ComfyUI's .latent files (SaveLatent writes them), read by LoadLatent from the input folder
    "input_latents": (".latent",),
    "upscale_models": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    # ControlNets and T2I-Adapters (ComfyUI also reads models/t2i_adapter for this kind)
    "controlnet": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    "clip_vision": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    "style_models": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    "gligen": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    "hypernetworks": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    # TAESD preview decoders (taesd, taesdxl, taesd3, taef1 and their encoders), as ComfyUI names the folder
    "vae_approx": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
    # ModelPatchLoader's files (USO's style projector), as ComfyUI names the folder
    "model_patches": (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"),
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: ComfyUI's older folder names, searched after the new ones (its "unet" and "clip" folders)
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {"diffusion_models": ("unet",), "text_encoders": ("clip",),
                                               "controlnet": ("t2i_adapter",)}


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


def check_name(name: str) -> str:
    """``name`` as a clean relative path (``a/b.safetensors``), checked lexically; PathError says why not.

    Lexical on purpose: symlinks inside a model folder (a folder shared with ComfyUI or A1111, the Hugging Face
    cache) are followed, so where a name resolves to on disk cannot decide; what the name itself says can. No
    absolute names, no ``..`` that leaves the folder, no NUL, no backslash (a Windows separator that would mean
    something else here), not the folder itself.
    """
    if not isinstance(name, str) or not name:
        raise PathError("the name is empty")
    if "\0" in name:
        raise PathError(f"{name!r} holds a NUL character")
    if "\\" in name:
        raise PathError(f"{name!r} holds a backslash: not a relative name here (use '/' between folders)")
    if name.startswith("/"):
        raise PathError(f"{name!r} is not a relative name")
    norm = posixpath.normpath(name)
    if norm == ".":
        raise PathError(f"{name!r} names the folder itself, not a file in it")
    if norm == ".." or norm.startswith("../"):
        raise PathError(f"{name!r} points outside its folder")
    return norm


def inside(folder: Path, name: str) -> Path:
    """``name`` inside ``folder``, checked lexically (see ``check_name``); symlinks in it are not resolved.

    The folder is made absolute (so the path does not depend on a later change of directory); the name is
    joined after normalising, so a ``..`` in it never reaches the operating system (which would take the
    parent of a symlink's target, not of the link).
    """
    try:
        norm = check_name(name)
    except PathError as exc:
        raise PathError(f"{exc} (in {folder})") from None
    return Path(os.path.abspath(folder)) / norm


def check_output_prefix(prefix: str) -> str | None:
    """Why a SaveImage ``filename_prefix`` would write outside the output folder, or None.

    The same lexical rules as model names (ComfyUI also refuses a prefix that leaves its output folder), applied
    to the folder part; checked by validation so the job is refused before anything runs.
    """
    if not isinstance(prefix, str) or not prefix.strip():
        return "the file name prefix is empty"
    if "\0" in prefix:
        return f"{prefix!r} holds a NUL character"
    folder, _, stem = prefix.replace("\\", "/").rpartition("/")
    if not stem:
        return f"{prefix!r} ends with a folder separator"
    if prefix.startswith(("/", "\\")) or os.path.isabs(prefix):
        return f"{prefix!r} is an absolute path: the prefix names a file (or sub-folder/file) in the output folder"
    if folder:
        norm = posixpath.normpath(folder)
        if norm == ".." or norm.startswith("../"):
            return f"{prefix!r} points outside the output folder"
    return None


@dataclass(frozen=True)
class ModelPaths:
    """The models folder of one run (and the input folder that LoadImage reads), plus the folders of other
    installs (ComfyUI's extra_model_paths.yaml) searched after it."""

    root: Path
    input_dir: Path | None = None
    #: (kind, folder) pairs searched after root/kind
    extra: tuple[tuple[str, Path], ...] = ()

    def folder(self, kind: str) -> Path:
        if kind in ("input", "input_latents"):
            return self.input_dir if self.input_dir is not None else default_input_dir()
        return self.root / kind

    def folders(self, kind: str) -> list[Path]:
        aliases = [self.root / alias for alias in FOLDER_ALIASES.get(kind, ())]
        return [self.folder(kind)] + aliases + [folder for k, folder in self.extra if k == kind]

    def list(self, kind: str) -> list[str]:
        """File names (relative, with sub-folders) in the model folders; diffusers folders for checkpoints."""
        names: list[str] = []
        for folder in self.folders(kind):
            names.extend(n for n in self.list_folder(kind, folder) if n not in names)
        return sorted(names, key=str.lower)

    def list_folder(self, kind: str, folder: Path) -> list[str]:
        """The names ``list`` finds in one of the folders of ``kind`` (each resolves with ``resolve``)."""
        if not folder.is_dir():
            return []
        suffixes = MODEL_FOLDERS.get(kind, (".safetensors",))
        names: list[str] = []
        for here, dirnames, filenames in walk(folder):
            if kind == "checkpoints":
                for d in list(dirnames):
                    if is_diffusers_folder(here / d):
                        names.append((here / d).relative_to(folder).as_posix())
                        dirnames.remove(d)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names.extend(
                (here / f).relative_to(folder).as_posix()
                for f in filenames
                if f.lower().endswith(suffixes) and not f.startswith(".") and (here / f).is_file()
            )
        return [n for n in names if _loadable_name(n)]

    def resolve(self, kind: str, name: str) -> Path:
        """The path of ``name`` in the folders of ``kind``; PathError when it is in none of them.

        Symlinks inside the folders are followed (the path returned is the link's, not its target's); the name
        itself is checked lexically first (``check_name``).
        """
        folders = self.folders(kind)
        for folder in folders:
            path = inside(folder, name)
            if path.is_file() or (kind == "checkpoints" and is_diffusers_folder(path)):
                return path
            if path.is_dir():
                raise PathError(f"{name!r} in {folder} is a folder, not a model file"
                                + (" (nor a diffusers model folder: no model_index.json)"
                                   if kind == "checkpoints" else ""))
        where = " or ".join(str(f) for f in folders)
        raise PathError(f"{name!r} not found in {where}")

    def fingerprint(self, kind: str, name: str) -> list[object]:
        """Size and mtime of a model file (or of a diffusers folder's files): part of cache keys.

        Symlinks count as what they point to (a Hugging Face snapshot's files are links into ``blobs/``)."""
        path = self.resolve(kind, name)
        if path.is_dir():
            files = sorted(here / f for here, _, filenames in walk(path) for f in filenames if (here / f).is_file())
        else:
            files = [path]
        out: list[object] = [str(path)]
        for f in files:
            st = f.stat()
            out += [f.relative_to(path).as_posix() if f != path else f.name, st.st_size, st.st_mtime_ns]
        return out


def _loadable_name(name: str) -> bool:
    """Whether ``resolve`` accepts the name lexically: what ``list`` offers must load."""
    try:
        check_name(name)
    except PathError:
        return False
    return True


#: deeper than any real model folder; bounds a walk through links to far-away trees
MAX_DEPTH = 24


def walk(folder: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` following symlinked folders, each real folder entered once: a link loop (``ln -s . l``)
    or two links to one folder cannot make it endless. Prune ``dirnames`` in place as with ``os.walk``."""
    seen: set[tuple[int, int]] = set()
    try:
        st = os.stat(folder)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        return
    base_depth = len(Path(folder).parts)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            try:
                st = os.stat(here / d)
            except OSError:  # a broken link
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode) and key not in seen and len(here.parts) - base_depth < MAX_DEPTH:
                seen.add(key)
                keep.append(d)
        dirnames[:] = keep
        yield here, dirnames, sorted(filenames)


# ComfyUI's folder names in extra_model_paths.yaml, mapped to ours.
_EXTRA_KINDS = {"checkpoints": "checkpoints", "loras": "loras", "vae": "vae", "embeddings": "embeddings",
                "diffusion_models": "diffusion_models", "unet": "diffusion_models",
                "text_encoders": "text_encoders", "clip": "text_encoders", "upscale_models": "upscale_models",
                "controlnet": "controlnet", "t2i_adapter": "controlnet", "clip_vision": "clip_vision",
                "style_models": "style_models", "gligen": "gligen", "hypernetworks": "hypernetworks",
                "vae_approx": "vae_approx", "model_patches": "model_patches"}


def read_extra_model_paths(path: Path) -> tuple[tuple[str, Path], ...]:
    """The folders of a ComfyUI ``extra_model_paths.yaml`` (its ``comfyui:`` and ``a111:`` sections alike).

    Raises PathError naming the file when it cannot be read.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, a number too big to read
        raise PathError(f"{path}: cannot read it as ComfyUI's extra_model_paths.yaml: {exc}") from None
    except RecursionError:
        raise PathError(f"{path}: cannot read it as ComfyUI's extra_model_paths.yaml: nested too deeply") from None
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

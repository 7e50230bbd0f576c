"""A UNet family's single file to models ready to sample, at the speed of reading and casting its tensors.

diffusers' ``from_single_file`` reads the whole file, randomly initialises the text encoder before
overwriting it, sets every parameter through accelerate one at a time and casts again at the end: about
1.25x to 1.4x the time of just reading the file and casting it (docs/benchmarks.md, figure 5b). Here:

- the file's tensors are memory-mapped views (``safe_open``), so renaming them to diffusers' keys (with
  diffusers' own conversion functions, which only move dict entries around) reads nothing;
- each model is built on the meta device without any initialisation, from the config folder that
  ``modelfiles/configs.py`` derived from the tensor shapes;
- every tensor is cast once, straight to the compute dtype and device, in file order, on a thread of its
  own while the models, tokenizers and scheduler are built; the cast tensors are assigned to the models as
  their parameters (``load_state_dict(assign=True)``): no second copy of any weight is ever made;
- tokenizers are built once per configuration and shared (they hold no per-model state);
- a text encoder or VAE whose tensors are byte for byte those of one already loaded (another checkpoint
  with the same CLIP or VAE, a copy of a file) is that same module (``SharedParts``).

Worker side only: imports torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import PICKLE_SUFFIXES

#: where each text tower sits in an original-layout file and how diffusers converts it, checked in the order
#: of diffusers' ``create_diffusers_clip_model_from_ldm``: (prefix, probe tensor, kind, whether the probe's last
#: dimension must be the model's width; SDXL files hold a CLIP-L probe next to the wider OpenCLIP tower)
_TEXT_LAYOUTS = (
    ("cond_stage_model.transformer.", "text_model.embeddings.position_embedding.weight", "clip", True),
    ("conditioner.embedders.0.transformer.", "text_model.embeddings.position_embedding.weight", "clip", True),
    ("cond_stage_model.model.", "token_embedding.weight", "openclip", True),
    ("conditioner.embedders.1.model.", "positional_embedding", "openclip", True),
    ("conditioner.embedders.0.model.", "text_projection", "openclip", False),
)
_VAE_PREFIX = "first_stage_model."


@dataclass
class Phases:
    """Seconds spent in each phase of one load (the benchmark's breakdown; also logged)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + value


#: the phases of the latest load in this process (benchmarks read it)
last_phases = Phases()


def open_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single file without reading it: memory-mapped views (safetensors) or torch.load's
    mmap (weights-only pickles, which the caller has already allowed)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from tui_diffusion.pipeline.models import read_pickle_checkpoint

        return read_pickle_checkpoint(path)
    from safetensors import safe_open

    from tui_diffusion.modelfiles.readahead import read_ahead

    read_ahead([path])  # a file not in the page cache yet is read while the models are built
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_CONVERSION = "diffusers.loaders.single_file_utils"
_SCIPY_LOCK = threading.RLock()
#: a scheduler module's import of scipy, done only when diffusers finds scipy installed: ``import scipy.stats``
#: binds ``scipy``, ``from scipy import integrate`` binds ``integrate``
_SCIPY_IMPORT = re.compile(r"^\s+(?:import (scipy)(?:\.\w+)*|from scipy import (\w+))\s*$", re.MULTILINE)


class _LazyScipy:
    """Stands for ``scipy`` or one of its submodules in a module that skipped importing it: the real module is
    imported when an attribute is first read (a beta-sigma schedule), not when the module is."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        try:
            return getattr(module, attr)
        except AttributeError:
            return importlib.import_module(f"{self._name}.{attr}")  # ``scipy.stats`` before it was imported


def conversion_module() -> Any:
    """diffusers' key conversion functions (``single_file_utils``), imported without ``scipy.stats``: the
    module imports nine scheduler classes at its top, each of which imports ``scipy.stats`` (see
    ``_without_scipy_stats``), for functions that only rename dict keys."""
    found = sys.modules.get(_CONVERSION)
    if found is not None:
        return found
    with _without_scipy_stats():
        return importlib.import_module(_CONVERSION)


@contextlib.contextmanager
def _without_scipy_stats() -> Iterator[None]:
    """Import diffusers' scheduler modules without their ``import scipy.stats`` (``scipy.integrate`` too).

    Each scheduler module imports scipy's statistics when scipy is installed, for beta-sigma schedules; a
    fresh worker's first load met them through the conversion module and a scheduler's ``from_config`` (which
    imports every compatible scheduler class): about 500 modules and most of a second, for schedules no
    sampler of ours takes from diffusers (ours import scipy themselves for the beta schedule and LMS). So
    these imports run with diffusers' ``_scipy_available`` flag off, and each diffusers module imported
    meanwhile that skipped a scipy import gets a lazy stand-in under the name that import binds: diffusers'
    schedulers still work with beta sigmas, importing scipy then. Where scipy's statistics are loaded
    already, or diffusers has no such flag, nothing is changed."""
    from diffusers.utils import import_utils

    if "scipy.stats" in sys.modules or getattr(import_utils, "_scipy_available", False) is not True:
        yield
        return
    # the schedulers package itself reads the flag to choose real classes or placeholders (LMS needs scipy):
    # it is imported with the flag as it is (a lazy module: a few hundred microseconds)
    importlib.import_module("diffusers.schedulers")
    with _SCIPY_LOCK:
        before = set(sys.modules)
        import_utils._scipy_available = False
        try:
            yield
        finally:
            import_utils._scipy_available = True
            for name in set(sys.modules) - before:
                _stand_in_for_scipy(sys.modules.get(name), name)


def _stand_in_for_scipy(module: Any, name: str) -> None:
    """Bind lazy stand-ins for the scipy imports ``module`` skipped while diffusers said scipy was missing."""
    source = getattr(module, "__file__", None)
    if not name.startswith("diffusers.") or not source or not source.endswith(".py"):
        return
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError:
        return
    if "scipy" not in text:
        return
    namespace = vars(module)
    for package, submodule in _SCIPY_IMPORT.findall(text):
        bound, target = ("scipy", "scipy") if package else (submodule, f"scipy.{submodule}")
        namespace.setdefault(bound, _LazyScipy(target))


def _text_source(checkpoint: Mapping[str, Any], width: int) -> tuple[str, str]:
    """The prefix and kind of the text tower of this width (the model's hidden size)."""
    for prefix, probe, kind, check_width in _TEXT_LAYOUTS:
        tensor = checkpoint.get(prefix + probe)
        if tensor is not None and (not check_width or tensor.shape[-1] == width):
            return prefix, kind
    raise CheckpointError(f"no text encoder of width {width} in this checkpoint")


def _convert_text(checkpoint: Mapping[str, Any], config: Any) -> tuple[dict[str, Any], str]:
    """The text tower's tensors under transformers' names, and the file prefix they came from."""
    convert = conversion_module()
    prefix, kind = _text_source(checkpoint, config.hidden_size)
    sub = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if kind == "clip":
        state = convert.convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
    else:
        state = convert.convert_open_clip_checkpoint(SimpleNamespace(config=config), sub, prefix=prefix)
    return state, prefix


def _build(kind: str, folder: Path, sub: str, class_name: str) -> Any:
    """One model with every parameter on the meta device and no initialisation run."""
    from accelerate import init_empty_weights

    if kind == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        with init_empty_weights():
            return cls.from_config(cls.load_config(str(folder / sub)))
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, class_name)
    config = cls.config_class.from_pretrained(str(folder / sub), local_files_only=True)
    with no_init_weights(), init_empty_weights():
        return cls(config)


_TOKENIZERS: dict[tuple[str, str], Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer for this config folder, built once per distinct configuration (building one reads
    49k BPE merges: 0.2 s) and shared: tokenizers hold no state of their model."""
    from transformers import CLIPTokenizer

    files = sorted(p.name for p in folder.iterdir())
    key = (json.dumps([(n, (folder / n).read_text(encoding="utf-8")) for n in files if n.endswith(".json")]),
           str(len(files)))
    with _TOKENIZER_LOCK:
        found = _TOKENIZERS.get(key)
        if found is None:
            found = _TOKENIZERS[key] = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        return found


@dataclass
class _Part:
    """One model of the pipeline: its diffusers/transformers class and its tensors under the model's names."""

    name: str
    library: str
    class_name: str
    dtype: torch.dtype
    state: dict[str, torch.Tensor]
    #: the file prefix of its tensors and its key among the shared parts (None: never shared, the UNet)
    prefix: str | None = None
    share_key: tuple | None = None


@dataclass(frozen=True)
class _SourceRecord:
    path: str
    size: int
    mtime_ns: int
    prefix: str
    layout: tuple


class SharedParts:
    """Text encoders and VAEs loaded in this process, by the layout of their tensors in the file: a new
    checkpoint whose part has the same layout (names, dtypes, shapes) and the same bytes as a live one reuses
    that module. The bytes are compared only when the layouts match, so other loads pay nothing; the
    comparison reads both files' part (a fraction of building and casting it)."""

    def __init__(self) -> None:
        self._live: list[tuple[tuple, _SourceRecord, weakref.ref]] = []
        self.reused = 0

    @staticmethod
    def layout(checkpoint: Mapping[str, torch.Tensor], prefix: str) -> tuple:
        return tuple(sorted((k[len(prefix):], str(v.dtype), tuple(v.shape)) for k, v in checkpoint.items()
                            if k.startswith(prefix)))

    def find(self, key: tuple, path: Path, checkpoint: Mapping[str, torch.Tensor], prefix: str) -> Any:
        """A live module with this key whose source tensors equal this file's; None otherwise."""
        self._live = [entry for entry in self._live if entry[2]() is not None]
        for live_key, record, ref in self._live:
            module = ref()
            if live_key != key or module is None:
                continue
            if _same_bytes(record, path, checkpoint, prefix):
                self.reused += 1
                return module
        return None

    def add(self, key: tuple, path: Path, prefix: str, module: Any) -> None:
        if path.suffix.lower() != ".safetensors":
            return
        stat = path.stat()
        self._live.append((key, _SourceRecord(str(path), stat.st_size, stat.st_mtime_ns, prefix, key[-1]),
                           weakref.ref(module)))

    def clear(self) -> None:
        self._live.clear()


def _same_bytes(record: _SourceRecord, path: Path, checkpoint: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """Whether this file's tensors under ``prefix`` hold the same bytes as the recorded file's (unchanged since
    it was loaded) under its prefix."""
    try:
        stat = os.stat(record.path)
        if (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns):
            return False
        if os.path.samefile(record.path, path) and record.prefix == prefix:
            return True  # the same file, unchanged
        other = open_tensors(Path(record.path))
    except (OSError, CheckpointError, RuntimeError):
        return False
    for name, _, _ in record.layout:
        a, b = checkpoint.get(prefix + name), other.get(record.prefix + name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() and not torch.equal(_bits(a), _bits(b)):
            return False
    return True


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so NaNs compare equal to themselves and -0.0 differs from 0.0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t


#: the shared text encoders and VAEs of this process
SHARED = SharedParts()


def load_models(path: Path, folder: Path, device: Any, shared: SharedParts | None = None) -> SimpleNamespace:
    """The models of a UNet-family single file as a pipeline-like namespace (unet, vae, text_encoder[_2],
    tokenizer[_2], scheduler, ``reused``: names of parts taken from ``shared``)."""
    import time

    convert = conversion_module()
    shared = SHARED if shared is None else shared
    phases = Phases()
    t0 = time.perf_counter()
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    checkpoint = open_tensors(path)
    t1 = time.perf_counter()
    phases.add("open", t1 - t0)
    parts: list[_Part] = []
    reused: dict[str, Any] = {}
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if name not in index or not (folder / name / "config.json").exists():
            continue
        library, class_name = index[name]
        config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        dtype = device.vae_dtype if name == "vae" else device.dtype
        prefix: str | None
        if name == "unet":
            state, prefix = convert.convert_ldm_unet_checkpoint(checkpoint, config), None
        elif name == "vae":
            prefix = _VAE_PREFIX
            vae = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
            state = convert.convert_ldm_vae_checkpoint(vae, config)
        else:
            state, prefix = _convert_text(checkpoint, SimpleNamespace(**config))
        if not state:
            raise CheckpointError(f"{path}: incomplete checkpoint: no {name} tensors")
        part = _Part(name, library, class_name, dtype, state, prefix)
        if prefix is not None:
            part.share_key = (name, class_name, str(dtype), str(device.torch_device), device.offload,
                              device.vae_tiling, json.dumps(config, sort_keys=True),
                              SharedParts.layout(checkpoint, prefix))
            found = shared.find(part.share_key, path, checkpoint, prefix)
            if found is not None:
                reused[name] = found
                continue
        parts.append(part)
    t2 = time.perf_counter()
    phases.add("convert keys", t2 - t1)

    target = device.torch_device if device.offload == "none" else torch.device("cpu")
    with ThreadPoolExecutor(1, thread_name_prefix="cast") as pool:
        cast = pool.submit(_cast_all, parts, target)
        built = {}
        for part in parts:
            built[part.name] = _build(part.library, folder, part.name, part.class_name)
        tokenizers = {name: tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")
                      if (folder / name).is_dir()}
        scheduler = _scheduler(folder, index)
        t3 = time.perf_counter()
        phases.add("build models (meta), tokenizers, scheduler", t3 - t2)
        casted = cast.result()
    t4 = time.perf_counter()
    phases.add("wait for the cast", t4 - t3)
    phases.add("cast (own thread, overlapping)", casted.pop("__seconds__"))
    out = SimpleNamespace(scheduler=scheduler, reused=set(reused), **tokenizers)
    for part in parts:
        model = built[part.name]
        _assign(model, casted[part.name], path, part.name)
        if part.share_key is not None and part.prefix is not None:
            shared.add(part.share_key, path, part.prefix, model)
        setattr(out, part.name, model)
    for name, model in reused.items():
        setattr(out, name, model)
    phases.add("assign", time.perf_counter() - t4)
    global last_phases
    last_phases = phases
    return out



def _cast_all(parts: list[_Part], target: torch.device) -> dict[str, Any]:
    """Every part's tensors in the compute dtype on the target device, converted in file order (the mapped
    pages are then read front to back, as the kernel's read-ahead expects). Each source tensor is read once."""
    import time

    start = time.perf_counter()
    jobs = [(t.data_ptr(), part.name, key, t, part.dtype) for part in parts for key, t in part.state.items()]
    jobs.sort(key=lambda job: job[0])
    out: dict[str, Any] = {part.name: {} for part in parts}
    done: dict[tuple[int, int, tuple, torch.dtype], torch.Tensor] = {}
    for _, name, key, t, dtype in jobs:
        if not t.is_floating_point():
            out[name][key] = t.to(target)
            continue
        ident = (t.data_ptr(), t.storage_offset(), tuple(t.stride()), dtype, tuple(t.shape))
        cast = done.get(ident)
        if cast is None:
            # a tensor already in the compute dtype is still copied out of the file's mapping: a parameter
            # left on the mapped file would fault (SIGBUS) if the file were replaced or truncated later
            cast = done[ident] = t.to(device=target, dtype=dtype, copy=not _owned(t))
        out[name][key] = cast
    out["__seconds__"] = time.perf_counter() - start
    return out


def _owned(t: torch.Tensor) -> bool:
    """Whether the tensor's memory is its own (a clone the key conversion made) rather than the file's."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _assign(model: Any, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    expected = model.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6: CLIPTextModel is flat
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint: the {name} lacks {len(missing)} tensors "
                              f"(first: {missing[0]!r})")
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: the {name} tensor {key!r} has shape {list(tensor.shape)}, the model "
                                  f"built from the file's other shapes expects {list(want.shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    model.eval()


def _scheduler(folder: Path, index: dict[str, Any]) -> Any:
    import diffusers

    with _without_scipy_stats():  # from_config imports every compatible scheduler class
        cls = getattr(diffusers, index["scheduler"][1])
        return cls.from_config(cls.load_config(str(folder / "scheduler")))


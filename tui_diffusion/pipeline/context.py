"""What a node implementation may use while it runs: device, caches, folders, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_diffusion.paths import ModelPaths, PathError
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.errors import Interrupted, NodeError
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.settings import Limits


@dataclass
class EngineState:
    """Lives as long as the worker: device, loaded models and folders."""

    device: Device
    models: ModelCache
    paths: ModelPaths
    output_dir: Path
    temp_dir: Path
    config_cache: Path
    #: loaded LoRA files (small; kept apart so they never push a checkpoint out)
    loras: ModelCache = field(default_factory=lambda: ModelCache(8))
    #: loaded upscale models (kept on the CPU between uses, apart from the checkpoints)
    upscale_models: ModelCache = field(default_factory=lambda: ModelCache(2))
    #: run history and the model-hash cache (None: not recorded)
    history: Any = None
    #: load pickle checkpoints (weights only); refused when False
    allow_pickle: bool = False
    limits: Limits = field(default_factory=Limits)
    #: how sampling previews are made (settings.PREVIEW_METHODS)
    preview_method: str = "auto"
    #: the step cache of models that no ApplyStepCache node set (settings.STEP_CACHE_METHODS)
    step_cache: str = "none"
    #: loaded TAESD preview decoders (tiny)
    previewers: ModelCache = field(default_factory=lambda: ModelCache(2))
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def model_hash(self, kind: str, name: str) -> str | None:
        """sha256 of a model file: once per process, and once per file version when there is a history."""
        try:
            path = self.paths.resolve(kind, name)
            if path.is_dir():
                return None
            key = repr(self.paths.fingerprint(kind, name))
            if key not in self._hashes:
                if self.history is not None:
                    self._hashes[key] = self.history.model_hash(path)
                else:
                    from tui_diffusion.store.history import sha256_file

                    self._hashes[key] = sha256_file(path)
            return self._hashes[key]
        except (OSError, ValueError):
            return None


@dataclass
class NodeContext:
    """One node's run within one job."""

    engine: EngineState
    node_id: str
    workflow: dict[str, Any]
    #: progress(step, total, preview_rgb_or_None)
    report: Callable[[int, int, Any], None]
    interrupted: Callable[[], bool]
    want_previews: bool = False

    def check_interrupt(self) -> None:
        if self.interrupted():
            raise Interrupted()

    def model_file(self, kind: str, name: str) -> tuple[Path, str]:
        """A model file's path, and the cache key of what is loaded from it on this device."""
        eng = self.engine
        try:
            path = eng.paths.resolve(kind, name)
            fingerprint = eng.paths.fingerprint(kind, name)
        except PathError as exc:
            raise NodeError(str(exc)) from None
        return path, repr((kind, fingerprint, str(eng.device.torch_device), str(eng.device.dtype)))

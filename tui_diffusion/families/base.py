"""What a model family is: its latent space, how it is recognised, built and conditioned.

A family is an object, not a string (ComfyUI splits the same knowledge into ``latent_formats``,
``model_sampling`` and ``supported_models``). Everything family-specific lives on it; the nodes, the
sampler and the loaders ask it instead of testing names. Adding a family is one module holding a
subclass of ``Family`` (plus its shipped configs) registered in ``tui_diffusion.families``.

This module is torch-free at import (the TUI describes model files through it); methods that need
torch import it themselves and only run in the worker.

The hooks, in the order a checkpoint meets them:

- ``matches(header)``: does a single file (tensor names and shapes from its safetensors header)
  belong to this family? Torch-free.
- ``load_checkpoint(path, header, tensor, device, config_cache)``: build the models offline from the
  shipped configs and return ``LoadedCheckpoint`` (MODEL, CLIP, VAE).
- ``default_model_sampling(model)``: the model sampling object (``pipeline/model_sampling.py``) the
  sampler uses unless a ModelSampling* node replaced it.
- ``check_conditioning(model, entries)``: a clear ``NodeError`` for conditioning from another family.
- ``model_kwargs(model, entries, ...)``: the CONDITIONING entries of one batched model call become the
  network's keyword arguments; ``extra_channels(...)`` gives channels concatenated to its input
  (inpainting models); ``apply_model(model, x, timestep, kwargs)`` calls the network and returns its
  raw output (eps, v or flow), which the model sampling turns into x0.
- ``control_kwargs(model, residuals)``: ControlNet and T2I-Adapter outputs as the network's arguments.
- ``checkpoint_state(model, clip)``: the network and text encoders as a single file of this family holds them
  (CheckpointSave), with ``vae_prefix`` and ``modelspec_architecture`` for the rest of that file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui_diffusion.modelfiles.header import TensorInfo

#: a checkpoint's tensors by name (or just names, where the shapes do not matter)
Header = Mapping[str, TensorInfo | None]


@dataclass(frozen=True)
class LatentFormat:
    """The latent space of a family's VAE, as the model side sees it (ComfyUI's ``latent_formats``).

    LATENT holds what the VAE encodes, unscaled; the sampler applies ``process_in`` before sampling and
    ``process_out`` after.
    """

    channels: int
    scale_factor: float
    shift_factor: float = 0.0
    #: latent -> RGB approximation for live previews: one (r, g, b) row per channel, then a bias
    rgb_factors: tuple[tuple[float, float, float], ...] = ()
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: the TAESD decoder that fits this latent space (file name stem in ``vae_approx/``), if any
    taesd_decoder: str | None = None
    #: pixels per latent cell
    downscale: int = 8

    def process_in(self, x: Any) -> Any:
        """VAE latent -> the model's latent: ``(x - shift) * scale``."""
        return (x - self.shift_factor) * self.scale_factor

    def process_out(self, x: Any) -> Any:
        """The model's latent -> VAE latent."""
        return x / self.scale_factor + self.shift_factor


class Family:
    """One model family. Subclasses set the class attributes and override the hooks they need."""

    #: stable identifier (workflows, logs, tests); never tested by other modules
    id: str = ""
    #: what users read (``tui-diffusion models``)
    label: str = ""
    latent_format: LatentFormat = LatentFormat(4, 1.0)
    #: False for families recognised only to say why they cannot be loaded
    supported: bool = True
    reason: str = ""
    #: the text encoders, by ComfyUI's names ("clip_l", "clip_g", "openclip_h", "t5xxl")
    text_encoders: tuple[str, ...] = ()
    #: whether epsilon vs v-prediction is read from the weights themselves (SD2.x), so that ``models`` must
    #: look at a tensor to say which a file is
    prediction_from_weights: bool = False
    #: whether its flow shift follows the image size (Flux): what ``ModelSamplingFlux`` sets
    resolution_shift: bool = False
    #: whether its model takes tokens placed before the embedded text (``post_input_patches``: USO's style)
    post_input_tokens: bool = False
    #: where a single-file checkpoint of this family keeps its VAE (ComfyUI's ``vae_key_prefix``)
    vae_prefix: str = "first_stage_model."
    #: the ``modelspec.architecture`` ComfyUI's CheckpointSave writes for this family; None: it writes no modelspec
    modelspec_architecture: str | None = None

    # -- recognising a file (torch-free) ----------------------------------------------------------------
    def matches(self, header: Header) -> bool:
        """Whether a single-file checkpoint with these tensors is of this family."""
        return False

    # -- building (worker side) ------------------------------------------------------------------------
    def load_checkpoint(self, path: Path, header: Mapping[str, TensorInfo], tensor: Any, device: Any,
                        config_cache: Path) -> Any:
        """The MODEL, CLIP and VAE of a single file (``pipeline.models.LoadedCheckpoint``)."""
        raise NotImplementedError(f"{self.label}: loading is not implemented")

    def default_model_sampling(self, model: Any) -> Any:
        """The model sampling object of a loaded model (``pipeline/model_sampling.py``)."""
        raise NotImplementedError(f"{self.label}: no model sampling")

    # -- conditioning -> network call (worker side) -------------------------------------------------
    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        """Raise a NodeError when conditioning cannot drive this model (another family's CLIP)."""

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        """Keyword arguments of one batched network call: ``entries[i]`` conditions rows
        ``i*batch..(i+1)*batch`` of the input; ``negative[i]`` says whether it is an unconditional one."""
        raise NotImplementedError(f"{self.label}: no conditioning")

    def extra_channels(self, model: Any, latent_in: Any, mask: Any) -> Any:
        """Channels concatenated to the network's input (mask and masked image of inpainting models), built
        from the model-space latent and the noise mask (None without one); None when the model takes none."""
        return None

    def apply_model(self, model: Any, x: Any, timestep: Any, kwargs: dict[str, Any]) -> Any:
        """The network's raw output for input ``x`` at ``timestep`` (what the model sampling is given)."""
        raise NotImplementedError(f"{self.label}: no network call")

    def control_kwargs(self, model: Any, residuals: dict[str, list[Any]]) -> dict[str, Any]:
        """The network's keyword arguments for ControlNet/T2I-Adapter outputs summed over the batch
        (``pipeline/controlnet.py``): ``"down"`` and ``"mid"`` residuals, ``"intra"`` adapter features."""
        from tui_diffusion.pipeline.errors import NodeError

        raise NodeError(f"ControlNets and T2I-Adapters cannot control a {self.label} model yet")

    # -- writing (worker side) ------------------------------------------------------------------------
    def checkpoint_state(self, model: Any, clip: Any) -> dict[str, Any]:
        """The network's and the text encoders' tensors as a single file of this family holds them, the MODEL's
        and the CLIP's patches baked in (CheckpointSave; ``pipeline/checkpoint_save.py`` adds the VAE under
        ``vae_prefix`` and the metadata). A NodeError names the input that cannot be written."""
        from tui_diffusion.pipeline.errors import NodeError

        raise NodeError(f"model: saving a {self.label} model as a checkpoint is not supported yet (CheckpointSave "
                        "writes SD1.x, SD2.x, SDXL, SD3/SD3.5 and Flux.1 models)")

    def __repr__(self) -> str:
        return f"<family {self.id}>"


class UnsupportedFamily(Family):
    """A file recognised well enough to say why it cannot be loaded."""

    supported = False

    def __init__(self, id: str, label: str, reason: str) -> None:
        self.id, self.label, self.reason = id, label, reason


def as_header(keys: Header | Iterable[str]) -> Header:
    """A header from tensor names alone (shapes unknown), for callers that only have names."""
    if isinstance(keys, Mapping):
        return keys
    return dict.fromkeys(keys)


def has_prefix(header: Header, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in header)


def shape(header: Header, key: str) -> tuple[int, ...] | None:
    info = header.get(key)
    return info.shape if info is not None else None

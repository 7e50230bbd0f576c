"""Loading checkpoints into diffusers models, offline, and keeping a few of them in memory.

Single files in the original layout go through diffusers' ``from_single_file`` with a local
config folder derived from the file's tensor shapes; diffusers folders through
``from_pretrained``. Nothing here may reach the network.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.families import Family, detect
from tui_diffusion.modelfiles.configs import standalone_vae_configs, write_config_folder
from tui_diffusion.modelfiles.diffusers_folder import folder_family
from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo, read_header
from tui_diffusion.paths import PICKLE_SUFFIXES, is_diffusers_folder
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.placement import in_use, place

log = logging.getLogger(__name__)


@dataclass
class ModelHandle:
    """MODEL: the denoising network, its family and the noise schedule it was trained with."""

    #: the network (a UNet for the SD families; another family may hold its transformer here)
    unet: Any
    scheduler_config: dict[str, Any]
    family: Family
    device: Device
    source: str
    #: LoRA patches added while sampling (the cached UNet itself is never changed)
    patches: tuple = ()
    #: set by the ModelSampling* nodes; None: the family's default for this model
    model_sampling_override: Any = None
    #: set by DifferentialDiffusion: (sigma, noise mask, sigmas, model sampling) -> the mask for this step
    denoise_mask_function: Any = None
    #: set by ApplyStepCache (``pipeline/step_cache.py``): hooks attached to the network only while sampling
    step_cache: Any = None
    #: hypernetworks (``pipeline/hypernetwork.py``): hooks on the attention inputs, added only while sampling
    attention_patches: tuple = ()
    #: ComfyUI's "post_input" model patches (USOStyleReference, ``pipeline/nodes_uso.py``): tokens the family puts
    #: before the embedded text tokens of every call
    post_input_patches: tuple = ()

    @property
    def model_sampling(self) -> Any:
        """How sigmas map to the network's timesteps and outputs to x0 (``pipeline/model_sampling.py``)."""
        if self.model_sampling_override is not None:
            return self.model_sampling_override
        return self.family.default_model_sampling(self)


@dataclass
class TextEncoder:
    """One tokenizer and text encoder of a CLIP (SDXL has two)."""

    tokenizer: Any
    model: Any
    #: an earlier hidden layer is read through the final layer norm (SD1.x) or raw (SDXL)
    norm_hidden: bool = True
    #: this encoder's projected pooled output conditions the UNet (SDXL's bigG)
    pooled: bool = False


@dataclass
class ClipHandle:
    """CLIP: the text encoders whose outputs are concatenated into the conditioning."""

    encoders: list[TextEncoder]
    device: Device
    #: hidden layer to read: -1 is the last (ComfyUI's CLIPSetLastLayer); SDXL reads the penultimate
    layer: int = -1
    #: LoRA patches added while encoding
    patches: tuple = ()
    #: where ``embedding:name`` in a prompt looks for textual-inversion files
    embeddings_dir: Path | None = None
    #: whether pickle embeddings (A1111's .pt/.bin) may be read (``--allow-pickle``)
    allow_pickle: bool = False

    def parts(self) -> dict[str, Any]:
        """The encoders by the names LoRA files use for them."""
        return {f"te{i + 1}": e.model for i, e in enumerate(self.encoders)}


@dataclass
class VaeHandle:
    """VAE: encodes to and decodes from LATENT as it is, unscaled (the model's family scales latents)."""

    vae: Any
    device: Device

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, pixels: Any) -> Any:
        """IMAGE [B,H,W,3] in 0..1 -> latent (the distribution's mean, as ComfyUI takes)."""
        x = pixels.movedim(-1, 1).to(self.device.torch_device, self.device.vae_dtype) * 2 - 1
        with in_use(self.vae):
            return self.vae.encode(x).latent_dist.mean.float().cpu()

    def decode(self, latent: Any) -> Any:
        """latent [1,C,h,w] -> pixels [1,3,H,W] in -1..1 (float, on the CPU)."""
        z = latent.to(self.device.torch_device, self.device.vae_dtype)
        with in_use(self.vae):
            return self.vae.decode(z, return_dict=False)[0].float().cpu()


@dataclass
class LoadedCheckpoint:
    model: ModelHandle
    clip: ClipHandle
    vae: VaeHandle


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


_TORCH_TO_SAFETENSORS = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}


def load_weights_only(path: Path, error: type[Exception] = CheckpointError) -> Any:
    """What a pickle file (.ckpt/.pt/.pth/.bin) holds, through ``torch.load(weights_only=True)`` only: a pickle
    that would build anything but tensors and plain containers (and so could run code) is refused unread, with
    ``error`` naming the file. The one place every loader reads pickles."""
    import pickle
    import zipfile

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "not weights only"
        raise error(f"{path}: refused: this pickle holds more than weights, so loading it could run "
                    f"code ({reason})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise error(f"{path}: cannot read this pickle file: {exc}") from None


def read_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a pickle checkpoint (``load_weights_only``), under its ``state_dict`` if nested."""
    obj = load_weights_only(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(obj).__name__}, not named tensors)")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read_checkpoint_header(path: Path, allow_pickle: bool) -> tuple[dict[str, TensorInfo], Any]:
    """The tensor names and shapes of a single-file checkpoint, and a reader for one tensor."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded "
                                  "and are refused; use the .safetensors version of the model, or allow them with "
                                  "--allow-pickle (loaded with torch.load(weights_only=True))")
        state = read_pickle_checkpoint(path)
        header = {k: TensorInfo(_TORCH_TO_SAFETENSORS.get(v.dtype, str(v.dtype)), tuple(v.shape))
                  for k, v in state.items()}
        return header, state.__getitem__
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors checkpoint")

    def tensor(name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    return read_header(path), tensor


def load_checkpoint(path: Path, device: Device, config_cache: Path, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint file or diffusers folder; CheckpointError names the file on failure."""
    _quiet_libraries()
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder in checkpoints/ must be a diffusers model (model_index.json)")
        family = folder_family(path)  # from the folder's configs: SD1.x, SD2.x eps/v, SDXL base or refiner
        try:
            pipe = family.pipeline_class().from_pretrained(str(path), **_pipeline_kwargs(family, device))
        except Exception as exc:  # diffusers raises many types for bad folders
            raise CheckpointError(f"{path}: cannot load this diffusers folder: {exc}") from None
        return finish_pipeline(family, pipe, device, str(path))
    header, tensor = _read_checkpoint_header(path, allow_pickle)
    try:
        family = detect(header)
        if not family.supported:
            raise CheckpointError(f"{path}: {family.reason}")
        return family.load_checkpoint(path, header, tensor, device, config_cache)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        # a crafted or damaged header (a 1-D conv weight, a missing dimension): name the file, say what broke
        raise CheckpointError(f"{path}: not a usable checkpoint: its tensors do not have the shapes its keys "
                              f"promise ({type(exc).__name__}: {exc})") from None


def load_single_file_pipeline(family: Any, path: Path, folder: Path, device: Device) -> LoadedCheckpoint:
    """A UNet family's checkpoint built from a local config folder at the speed of reading and casting its
    tensors (``modelfiles/single_file.py``: meta models, memory-mapped tensors cast once and assigned); a text
    encoder or VAE identical to one already loaded is that one."""
    from tui_diffusion.modelfiles.single_file import load_models

    try:
        pipe = load_models(path, folder, device)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load this checkpoint: {exc}") from None
    return finish_pipeline(family, pipe, device, str(path))


def finish_pipeline(family: Any, pipe: Any, device: Device, source: str) -> LoadedCheckpoint:
    """Place a loaded pipeline's models by the device policy and wrap them as MODEL, CLIP and VAE (models
    reused from another checkpoint, ``pipe.reused``, are in place already)."""
    clip = family.make_clip(pipe, device)
    reused = getattr(pipe, "reused", set())
    shared = {id(getattr(pipe, name)) for name in reused}
    for module in [pipe.unet] + [e.model for e in clip.encoders]:
        if id(module) not in shared:
            place(module, device, device.dtype)
    if "vae" not in reused:
        _place_vae(pipe.vae, device)
    if device.compile:
        compile_unet(pipe.unet, device)
    return LoadedCheckpoint(
        model=ModelHandle(pipe.unet, dict(pipe.scheduler.config), family, device, source),
        clip=clip,
        vae=VaeHandle(pipe.vae, device),
    )


def compile_unet(unet: Any, device: Device) -> None:
    """``torch.compile`` the UNet in place (the module stays the same object). On the CPU with inductor's
    freezing: the weights become constants of the compiled graph, which lets oneDNN use them prepacked
    (about twice as fast at SD1.5 size on a 2-core CPU, for a second copy of the UNet's weights in memory).
    Frozen weights cannot see a LoRA's patches, so a patched UNet runs uncompiled (see ``unet_call``)."""
    if device.torch_device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True
        unet._tui_frozen = True
    unet.compile()


def unet_call(unet: Any, patched: bool) -> Any:
    """The UNet's call: compiled, unless its compiled graph froze weights that a LoRA now changes."""
    if patched and getattr(unet, "_tui_frozen", False):
        return unet._call_impl  # eager, with the patched weights (hooks still run)
    return unet


def _pipeline_kwargs(family: Any, device: Device) -> dict[str, Any]:
    return {"torch_dtype": device.dtype, "local_files_only": True, **family.pipeline_kwargs()}


def load_vae(path: Path, device: Device, config_cache: Path, allow_pickle: bool = False) -> VaeHandle:
    """A standalone VAE file (models/vae) in the original layout, or a diffusers-layout one; a pickle (.ckpt, .pt:
    ``kl-f8-anime2.ckpt`` and other VAEs published so, which ComfyUI loads) only with ``allow_pickle``."""
    from diffusers import AutoencoderKL

    _quiet_libraries()
    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    if not pickled and path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors VAE files (and pickles, with --allow-pickle) are supported")
    if pickled:
        header, tensor = _read_checkpoint_header(path, allow_pickle)
    else:
        header = read_header(path)
    try:
        if any(k.startswith("encoder.down_blocks.") for k in header):  # diffusers layout
            from safetensors.torch import load_file

            state = {k: tensor(k) for k in header} if pickled else load_file(str(path))
            channels = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                        for i in range(sum(1 for k in state if k.endswith(".resnets.0.conv1.weight")
                                           and k.startswith("encoder.down_blocks.")))]
            vae = AutoencoderKL(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * len(channels),
                                up_block_types=["UpDecoderBlock2D"] * len(channels),
                                latent_channels=state["decoder.conv_in.weight"].shape[1],
                                use_quant_conv="quant_conv.weight" in state,
                                use_post_quant_conv="post_quant_conv.weight" in state,
                                layers_per_block=sum(1 for k in state if k.startswith("encoder.down_blocks.0.resnets.")
                                                     and k.endswith(".conv1.weight")))
            vae.load_state_dict(state)
            vae.to(device.vae_dtype)
        else:
            folder = write_config_folder(standalone_vae_configs(header, str(path)), config_cache)
            if pickled:  # the tensors read once, weights only; the original keys converted as from_single_file does
                from tui_diffusion.modelfiles.single_file import conversion_module

                config = dict(AutoencoderKL.load_config(str(folder / "vae")))
                vae = AutoencoderKL.from_config(config)
                vae.load_state_dict(conversion_module().convert_ldm_vae_checkpoint(
                    {k: tensor(k) for k in header}, config))
                vae.to(device.vae_dtype)
            else:
                vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae",
                                                     local_files_only=True, torch_dtype=device.vae_dtype)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load this VAE: {exc}") from None
    if vae.config.latent_channels not in (4, 16):
        raise CheckpointError(f"{path}: a VAE with {vae.config.latent_channels} latent channels; 4 (SD1.x, SD2.x, "
                              "SDXL) and 16 (SD3, Flux) are supported")
    _place_vae(vae, device)
    return VaeHandle(vae, device)


def _place_vae(vae: Any, device: Device) -> None:
    place(vae, device, device.vae_dtype)
    if device.vae_tiling:
        vae.enable_tiling()


class ModelCache:
    """Up to ``capacity`` loaded checkpoints, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, LoadedCheckpoint] = OrderedDict()
        self.loads = 0

    def get(self, key: str, loader) -> LoadedCheckpoint:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.capacity:
            old, _ = self._items.popitem(last=False)
            log.info("dropping %s from the model cache", old)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        item = loader()
        self.loads += 1
        self._items[key] = item
        return item

    def clear(self) -> None:
        self._items.clear()

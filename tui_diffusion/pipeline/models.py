"""Loading checkpoints into diffusers models, offline, and keeping a few of them in memory.

Single files in the original layout go through diffusers' ``from_single_file`` with a local
config folder derived from the file's tensor shapes; diffusers folders through
``from_pretrained``. Nothing here may reach the network.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.configs import family_configs, standalone_vae_configs, write_config_folder
from tui_diffusion.modelfiles.family import V_PRED_PROBE, detect_family
from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo, read_header
from tui_diffusion.paths import PICKLE_SUFFIXES, is_diffusers_folder
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.placement import in_use, place

log = logging.getLogger(__name__)


@dataclass
class ModelHandle:
    """MODEL: the UNet and the noise schedule it was trained with."""

    unet: Any
    scheduler_config: dict[str, Any]
    family: str
    device: Device
    source: str
    #: LoRA patches added while sampling (the cached UNet itself is never changed)
    patches: tuple = ()


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

    def parts(self) -> dict[str, Any]:
        """The encoders by the names LoRA files use for them."""
        return {f"te{i + 1}": e.model for i, e in enumerate(self.encoders)}


@dataclass
class VaeHandle:
    vae: Any
    device: Device

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, pixels: Any) -> Any:
        """IMAGE [B,H,W,3] in 0..1 -> scaled latent (the distribution's mean, as ComfyUI takes)."""
        x = pixels.movedim(-1, 1).to(self.device.torch_device, self.device.vae_dtype) * 2 - 1
        with in_use(self.vae):
            return self.vae.encode(x).latent_dist.mean.float().cpu() * self.scaling_factor


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


def read_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.bin file, through ``torch.load(weights_only=True)`` only: a pickle that
    would build anything but tensors and plain containers (and so could run code) is refused unread."""
    import pickle
    import zipfile

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "not weights only"
        raise CheckpointError(f"{path}: refused: this pickle holds more than weights, so loading it could run "
                              f"code ({reason})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read this pickle checkpoint: {exc}") from None
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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    _quiet_libraries()
    common: dict[str, Any] = dict(
        torch_dtype=device.dtype, local_files_only=True, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder in checkpoints/ must be a diffusers model (model_index.json)")
        try:
            index = json.loads((path / "model_index.json").read_text())
            family = "sdxl" if index.get("_class_name") == "StableDiffusionXLPipeline" else "sd1"
            cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
            pipe = cls.from_pretrained(str(path), **_pipeline_kwargs(family, common))
        except Exception as exc:  # diffusers raises many types for bad folders
            raise CheckpointError(f"{path}: cannot load this diffusers folder: {exc}") from None
    else:
        header, tensor = _read_checkpoint_header(path, allow_pickle)
        conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight")
        fam = detect_family(header, conv_in.shape[1] if conv_in else None)
        if not fam.supported:
            raise CheckpointError(f"{path}: {fam.reason}")
        family = fam.id
        prediction = detect_prediction(header, tensor) if family == "sd2" else "epsilon"  # as ComfyUI: 4-channel only
        folder = write_config_folder(family_configs(header, fam, str(path), prediction), config_cache)
        cls = {"sdxl": StableDiffusionXLPipeline,
               "sdxl-refiner": StableDiffusionXLImg2ImgPipeline}.get(family, StableDiffusionPipeline)
        del tensor  # a pickle's tensors: diffusers reads the file again, also with weights_only=True
        try:
            pipe = cls.from_single_file(str(path), config=str(folder), **_pipeline_kwargs(family, common))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load this checkpoint: {exc}") from None
    if family == "sdxl":
        encoders = [TextEncoder(pipe.tokenizer, pipe.text_encoder, norm_hidden=False),
                    TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, norm_hidden=False, pooled=True)]
        clip = ClipHandle(encoders, device, layer=-2)
    elif family == "sdxl-refiner":  # the bigG encoder alone
        encoders = [TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, norm_hidden=False, pooled=True)]
        clip = ClipHandle(encoders, device, layer=-2)
    elif family.startswith("sd2"):  # the penultimate layer, through the final norm (ComfyUI's SD2 CLIP)
        clip = ClipHandle([TextEncoder(pipe.tokenizer, pipe.text_encoder)], device, layer=-2)
    else:
        clip = ClipHandle([TextEncoder(pipe.tokenizer, pipe.text_encoder)], device)
    for module in [pipe.unet] + [e.model for e in clip.encoders]:
        place(module, device, device.dtype)
    _place_vae(pipe.vae, device)
    if device.compile:
        compile_unet(pipe.unet, device)
    return LoadedCheckpoint(
        model=ModelHandle(pipe.unet, dict(pipe.scheduler.config), family, device, str(path)),
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


def detect_prediction(header: dict[str, Any], tensor: Any) -> str:
    """epsilon or v_prediction for an SD2.x file, the way ComfyUI tells them apart.

    A ``v_pred`` marker tensor decides; otherwise the spread of one norm bias deep in the UNet, which
    training with the v objective leaves much wider (ComfyUI's heuristic). Files where neither tells can
    be overridden in the workflow with a ModelSamplingDiscrete node.
    """
    if "v_pred" in header:
        return "v_prediction"
    if V_PRED_PROBE not in header:
        return "epsilon"
    bias = tensor(V_PRED_PROBE).float()
    return "v_prediction" if float(bias.std(unbiased=False)) > 0.09 else "epsilon"


def _pipeline_kwargs(family: str, common: dict[str, Any]) -> dict[str, Any]:
    if family.startswith("sdxl"):
        return {k: v for k, v in common.items() if k not in ("safety_checker", "feature_extractor",
                                                                 "requires_safety_checker")} | {
            "add_watermarker": False}
    return common


def load_vae(path: Path, device: Device, config_cache: Path) -> VaeHandle:
    """A standalone VAE file (models/vae) in the original layout, or a diffusers-layout one."""
    from diffusers import AutoencoderKL

    _quiet_libraries()
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors VAE files are supported")
    header = read_header(path)
    try:
        if any(k.startswith("encoder.down_blocks.") for k in header):  # diffusers layout
            from safetensors.torch import load_file

            state = load_file(str(path))
            channels = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                        for i in range(sum(1 for k in state if k.endswith(".resnets.0.conv1.weight")
                                           and k.startswith("encoder.down_blocks.")))]
            vae = AutoencoderKL(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * len(channels),
                                up_block_types=["UpDecoderBlock2D"] * len(channels),
                                latent_channels=state["post_quant_conv.weight"].shape[0],
                                layers_per_block=sum(1 for k in state if k.startswith("encoder.down_blocks.0.resnets.")
                                                     and k.endswith(".conv1.weight")),
                                scaling_factor=0.18215)
            vae.load_state_dict(state)
        else:
            folder = write_config_folder(standalone_vae_configs(header, str(path)), config_cache)
            vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae",
                                                 local_files_only=True, torch_dtype=device.vae_dtype)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load this VAE: {exc}") from None
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

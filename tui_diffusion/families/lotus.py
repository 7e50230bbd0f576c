"""Lotus (Lotus-D, v1.x): an SD2.x UNet retrained to give, in one step, the latent of an image's depth map (or its
surface normals) from the latent of the image itself (ComfyUI's ``LotusD`` model and ``Lotus`` model base).

Files: the UNet alone, as published for ``diffusion_models/`` (``lotus-depth-d-v1-1.safetensors``): the original LDM
keys without a prefix (``model.diffusion_model.`` in re-saved copies), SD2.x's sizes (1024-wide cross-attention,
linear projections, 64 channels per head, 4 input channels) plus a class embedding of 4 inputs
(``label_emb.0.0.weight`` [1280, 4], ``label_emb.0.2``) that takes the task switcher. No text encoder and no VAE: the
workflow gives ``LotusConditioning``'s fixed null prompt and any SD1.x/SD2.x VAE. Loaded by UNETLoader only.

How it samples (ComfyUI's ``IMG_TO_IMG`` model sampling on SD's discrete schedule): the network is fed the latent
as it is (no 1/sqrt(sigma^2 + 1) scaling) and returns x0 itself. The templates run one Euler step from sigma 10000
(``SetFirstSigma``, timestep 999) with the noise disabled, so the result is the network's output for the image's
latent; the task embedding is ComfyUI's ``[sin(1), sin(0), cos(1), cos(0)]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tui_diffusion.families.base import Header, has_prefix, shape
from tui_diffusion.families.sd1 import UNET, UNetFamily
from tui_diffusion.modelfiles.header import TensorInfo

#: where a Lotus file's UNet keys sit: bare as published, or under the checkpoint prefix
PREFIXES = ("", UNET)
CONV_IN = "input_blocks.0.0.weight"
CLASS_EMBED = "label_emb.0.0.weight"
#: the width of the task embedding the class embedding takes (sin and cos of the two-number task switcher)
TASK_INPUTS = 4
#: text towers and other parts that say a file is a whole checkpoint, not a Lotus UNet
_OTHER_PARTS = ("cond_stage_model.", "conditioner.", "first_stage_model.")


def unet_prefix(header: Header) -> str | None:
    """The prefix of an LDM UNet's keys in a file ("" or ``model.diffusion_model.``); None without one."""
    for prefix in PREFIXES:
        if prefix + CONV_IN in header and prefix + "out.2.weight" in header:
            return prefix
    return None


class LotusFamily(UNetFamily):
    """SD2.x's UNet and latent space, without a text encoder (the sizes from the shapes, the rest from SD2.1's
    shipped configs)."""

    id = "lotus"
    label = "Lotus (SD2.x UNet: depth/normals)"
    template = "sd21-v"

    def matches(self, header: Header) -> bool:
        prefix = unet_prefix(header)
        if prefix is None or has_prefix(header, *_OTHER_PARTS):
            return False
        label, conv = shape(header, prefix + CLASS_EMBED), shape(header, prefix + CONV_IN)
        return (label is not None and len(label) == 2 and label[1] == TASK_INPUTS
                and conv is not None and len(conv) == 4 and conv[1] == 4)

    def prediction(self, header: Mapping[str, TensorInfo], tensor: Any) -> str:
        return "epsilon"  # the scheduler config's field; the model sampling is ``default_model_sampling``'s

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str = "epsilon"
                ) -> dict[str, dict[str, Any]]:
        """The UNet's and the noise schedule's configs (no text encoder, no VAE), from the shapes."""
        from tui_diffusion.modelfiles.configs import _load_json, package_config_dir, unet_config

        prefix = unet_prefix(header) or ""
        label = shape(header, prefix + CLASS_EMBED)
        # under the checkpoint prefix, without the class embedding (the shared reader takes one for SDXL's)
        rest = {UNET + k[len(prefix):]: v for k, v in header.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith("label_emb.")}
        base = package_config_dir(self.template)
        unet = unet_config(rest, _load_json(base / "unet" / "config.json"), file)
        unet["class_embed_type"] = "projection"
        unet["projection_class_embeddings_input_dim"] = int(label[1]) if label else TASK_INPUTS
        scheduler = _load_json(base / "scheduler" / "scheduler_config.json")
        scheduler["prediction_type"] = prediction
        return {"unet/config.json": unet, "scheduler/scheduler_config.json": scheduler}

    def load_checkpoint(self, path: Path, header: Mapping[str, TensorInfo], tensor: Any, device: Any,
                        config_cache: Path) -> Any:
        from tui_diffusion.modelfiles.header import CheckpointError

        raise CheckpointError(f"{path}: a Lotus diffusion model alone (no text encoder, no VAE): load it with "
                              "UNETLoader (Load Diffusion Model) from diffusion_models/, with LotusConditioning and "
                              "an SD1.x/SD2.x VAE")

    def load_diffusion_model(self, path: Path, header: Mapping[str, TensorInfo], device: Any,
                             weight_dtype: str = "default") -> Any:
        """MODEL from a ``diffusion_models/`` file (UNETLoader)."""
        from tui_diffusion.pipeline.lotus import load_lotus_unet

        return load_lotus_unet(self, path, header, device, weight_dtype)

    def default_model_sampling(self, model: Any) -> Any:
        from tui_diffusion.pipeline.lotus import ImgToImgSampling

        return ImgToImgSampling.from_scheduler_config(model.scheduler_config, "eps")

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        from tui_diffusion.pipeline.lotus import task_embedding

        kwargs = super().model_kwargs(model, entries, batch=batch, latent_shape=latent_shape, negative=negative,
                                      device=device, dtype=dtype)
        kwargs["class_labels"] = task_embedding().expand(batch * len(entries), -1).to(device, dtype)
        return kwargs


LOTUS = LotusFamily()

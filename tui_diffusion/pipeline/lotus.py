"""Lotus's worker side: its UNet from a ``diffusion_models/`` file, its model sampling, its task embedding and the
fixed null prompt LotusConditioning gives (the family is ``families/lotus.py``; the nodes ``nodes_lotus.py``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.families.sd1 import UNET
from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.model_sampling import DiscreteSampling
from tui_diffusion.pipeline.models import ModelHandle

#: the task switcher ComfyUI's Lotus model gives every call (depth and normal models alike)
TASK = (1.0, 0.0)


class ImgToImgSampling(DiscreteSampling):
    """ComfyUI's ``IMG_TO_IMG`` on SD's discrete schedule: the network gets the latent unscaled and returns x0
    (eps's noise scaling is kept: with the noise disabled the sampler starts from the image's latent)."""

    def calculate_input(self, sigma: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        return noisy

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        return model_output

    def describe(self) -> str:
        return "ImgToImgSampling(x0)"


def task_embedding(task: tuple[float, float] = TASK) -> torch.Tensor:
    """The class label of every Lotus call: ``[sin(a), sin(b), cos(a), cos(b)]`` of the task switcher, [1, 4]."""
    t = torch.tensor(task, dtype=torch.float32)
    return torch.cat([torch.sin(t), torch.cos(t)]).unsqueeze(0)


@functools.lru_cache(maxsize=1)
def _null_prompt_values() -> torch.Tensor:
    from tui_diffusion.modelfiles.configs import package_config_dir

    data = json.loads((package_config_dir("lotus") / "empty_prompt.json").read_text(encoding="utf-8"))
    return torch.tensor(data["values"], dtype=torch.float32).reshape(data["shape"])


def null_prompt() -> torch.Tensor:
    """LotusConditioning's embedding: the frozen text encoder's output for the empty prompt, [1, 2, 1024]."""
    return _null_prompt_values().clone()


def load_lotus_unet(family: Any, path: Path, header: Mapping[str, TensorInfo], device: Device,
                    weight_dtype: str = "default") -> ModelHandle:
    """A Lotus UNet file as diffusers' ``UNet2DConditionModel`` with a projection class embedding, on the device;
    ``weight_dtype`` fp8 rounds the weights through fp8 as ComfyUI's storage would."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tui_diffusion.families.lotus import unet_prefix
    from tui_diffusion.pipeline.models_dit import WEIGHT_DTYPES, TensorReader, _build, quiet_libraries
    from tui_diffusion.pipeline.placement import place

    quiet_libraries()
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weight_dtype {weight_dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
    prefix = unet_prefix(header)
    if prefix is None:
        raise CheckpointError(f"{path}: no UNet in this file")
    configs = family.configs(header, str(path))
    config = configs["unet/config.json"]
    reader = TensorReader(path, header)
    get = reader.getter(device.dtype, WEIGHT_DTYPES[weight_dtype])
    checkpoint = {UNET + k[len(prefix):]: get(k) for k in header
                  if k.startswith(prefix) and not k.endswith(".scale_weight")}
    try:
        state = convert_ldm_unet_checkpoint(checkpoint, config)
    except KeyError as exc:
        raise CheckpointError(f"{path}: incomplete Lotus UNet: tensor {exc} is missing") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = _build(UNet2DConditionModel, config, state, "Lotus UNet", path)
    place(unet, device, device.dtype)
    return ModelHandle(unet, configs["scheduler/scheduler_config.json"], family, device, str(path))

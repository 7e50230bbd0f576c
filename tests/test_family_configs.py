"""The shipped family configs describe the real models: built on the meta device, they have the published
parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from tui_diffusion.modelfiles.configs import package_config_dir


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _config(family: str, part: str) -> dict:
    return json.loads((package_config_dir(family) / part / "config.json").read_text())


@pytest.mark.parametrize(("family", "expected"), [("sd15", 859_520_964), ("sdxl-base", 2_567_463_684),
                                                  ("sd21-v", 865_910_724), ("sdxl-refiner", 2_259_526_660)])
def test_unet_parameter_counts(family: str, expected: int) -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config(family, "unet"))
    assert _count(unet) == expected


def test_vae_and_text_encoder_parameter_counts() -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_config("sd15", "vae"))
        clip_l = CLIPTextModel(CLIPTextConfig(**_config("sd15", "text_encoder")))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**_config("sdxl-base", "text_encoder_2")))
    assert _count(vae) == 83_653_863
    assert _count(clip_l) == 123_060_480
    assert _count(clip_g) == 694_659_840

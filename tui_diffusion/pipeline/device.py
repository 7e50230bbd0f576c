"""Turn the device policy into a torch device and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tui_diffusion.settings import DevicePolicy


@dataclass(frozen=True)
class Device:
    torch_device: torch.device
    #: dtype of the UNet and text encoder
    dtype: torch.dtype
    #: the VAE stays in float32: SD's VAE overflows in fp16
    vae_dtype: torch.dtype
    name: str


def resolve_device(policy: DevicePolicy) -> Device:
    want = policy.device
    if want == "auto":
        if torch.cuda.is_available():
            want = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            want = "mps"
        else:
            want = "cpu"
    dev = torch.device(want)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    elif dev.type == "mps":
        name = "Apple MPS"
    else:
        name = "CPU"
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    return Device(dev, dtype, torch.float32, name)

"""Turn the device policy into a torch device and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tui_diffusion.settings import DevicePolicy

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Device:
    torch_device: torch.device
    #: dtype of the UNet and text encoder
    dtype: torch.dtype
    #: the VAE stays in float32 unless asked: SD's VAE overflows in fp16
    vae_dtype: torch.dtype
    name: str
    #: "none": models live on the device; "model": each model moves there while it runs (lowvram);
    #: "sequential": layer by layer (novram)
    offload: str = "none"
    #: decode (and encode) with the VAE in tiles
    vae_tiling: bool = False
    #: torch.compile the UNet when a checkpoint loads (--compile)
    compile: bool = False


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
    dtype = _DTYPES[policy.precision] if policy.precision else (torch.float32 if dev.type == "cpu" else torch.float16)
    vae_dtype = _DTYPES[policy.vae_precision] if policy.vae_precision else torch.float32
    offload = {"lowvram": "model", "novram": "sequential"}.get(policy.memory, "none")
    if dev.type == "cpu":
        offload = "none"  # nothing to offload to: the CPU is where the models are
    return Device(dev, dtype, vae_dtype, name, offload, vae_tiling=policy.memory in ("lowvram", "novram"),
                  compile=policy.compile)

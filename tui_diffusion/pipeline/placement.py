"""Which model sits on which device when: the memory policy (--lowvram, --novram) as one small unit.

Built on accelerate's hooks, as diffusers' own offloading is: ``model`` offload moves a whole model to
the GPU when it runs and back to the CPU when its node is done; ``sequential`` streams layer by layer. The
diffusion transformers of SD3 and Flux (8 and 24 GB in bf16) do not fit a small GPU whole: under ``model``
offload their blocks are streamed one at a time by diffusers' group offloading (on CUDA with a side stream, so
the next block's copy overlaps this block's compute; its weights are pinned as they are sent, so a merge patched
into them between runs is what is sent).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from tui_diffusion.pipeline.device import Device

_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def place(module: torch.nn.Module, device: Device, dtype: torch.dtype | None) -> None:
    """Put a freshly loaded model where the policy keeps it between uses (``dtype`` None: keep the dtypes it
    has, e.g. fp8 storage under layerwise casting)."""
    if dtype is not None:
        module.to(dtype=dtype)
    module.eval().requires_grad_(False)
    if device.offload == "none":
        module.to(device.torch_device)
    elif device.offload == "model" and type(module).__name__ in STREAMED:
        stream_blocks(module, device)
    elif device.offload == "model":
        from accelerate import cpu_offload_with_hook

        module.to("cpu")
        _, hook = cpu_offload_with_hook(module, execution_device=device.torch_device)
        _HOOKS[module] = hook
    elif device.offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(module, execution_device=device.torch_device)
    else:
        raise ValueError(f"unknown offload mode {device.offload!r}")


#: the models whose blocks stream under ``model`` offload (``--lowvram``)
STREAMED = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def stream_blocks(module: Any, device: Device) -> None:
    """Keep the model on the CPU and move one block at a time to the device while it runs."""
    module.to("cpu")
    cuda = device.torch_device.type == "cuda"
    module.enable_group_offload(onload_device=device.torch_device, offload_device=torch.device("cpu"),
                                offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                                low_cpu_mem_usage=cuda)


def home_device(module: torch.nn.Module) -> torch.device:
    """Where the module's weights are now (the meta device for layer-by-layer offload)."""
    return next(module.parameters()).device


@contextlib.contextmanager
def in_use(*modules: torch.nn.Module) -> Iterator[None]:
    """While a node uses these models; afterwards, models under model offload go back to the CPU."""
    try:
        yield
    finally:
        for module in modules:
            hook = _HOOKS.get(module)
            if hook is not None:
                hook.offload()

"""Which model sits on which device when: the memory policy (--lowvram, --novram) as one small unit.

Built on accelerate's hooks, as diffusers' own offloading is: ``model`` offload moves a whole model to
the GPU when it runs and back to the CPU when its node is done; ``sequential`` streams layer by layer.
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

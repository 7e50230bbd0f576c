"""Hypernetworks (A1111's): small MLPs that change the key and value inputs of a UNet's attention layers.

As ComfyUI's HypernetworkLoader: per attention width, two MLPs (for the key and for the value input); in every
self- and cross-attention whose key input has that width, the inputs become ``k + mlp_k(k) * strength`` and
``v + mlp_v(v) * strength`` (self-attention's inputs are the block's hidden states, cross-attention's the text).
The MLPs are read as ComfyUI reads them: the file's ``*.weight`` entries in order, each a Linear (or, with
``is_layer_norm``, every second one a LayerNorm), the activation after each Linear but the list's last unless
``activate_output``, dropout flags kept in the structure (dropout does nothing at inference; the layers run in eval
mode). A hypernetwork is a patch of the MODEL, applied only while sampling through forward pre-hooks on the
attention's ``to_k``/``to_v`` and removed after, so the cached UNet never changes.

Files: A1111's ``.pt`` (a pickle of ``{width: [key state dict, value state dict], "activation_func": ...}``;
refused unless pickles are allowed, then read with ``torch.load(weights_only=True)``), or ``.safetensors`` with the
same tensors under ``"{width}.{0|1}.{layer}.weight"`` names and the flags in the header's metadata.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.paths import PICKLE_SUFFIXES
from tui_diffusion.pipeline.errors import NodeError

#: the activation functions ComfyUI's loader knows (A1111's "swish" is torch's Hardswish there too)
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign, "mish": torch.nn.Mish,
}
#: the flags ComfyUI reads, with its defaults
FLAGS: dict[str, Any] = {"activation_func": "linear", "is_layer_norm": False, "use_dropout": False,
                         "activate_output": False, "last_layer_dropout": False}
_FLAT = re.compile(r"^(\d+)\.([01])\.(.+)$")


@dataclass(eq=False)
class Hypernetwork:
    """One loaded hypernetwork file."""

    source: str
    #: attention width -> (MLP of the key input, MLP of the value input)
    layers: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]]
    flags: dict[str, Any]

    @property
    def name(self) -> str:
        return Path(self.source).name


@dataclass(frozen=True, eq=False)
class HypernetworkPatch:
    """A hypernetwork at a strength: one of a MODEL's ``attention_patches``."""

    hypernetwork: Hypernetwork
    strength: float


# -- reading --------------------------------------------------------------------------------------------------
def _read(path: Path, allow_pickle: bool) -> dict[Any, Any]:
    """The file as A1111's nested dict: int widths to two state dicts, plus the flags."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise NodeError(f"{path}: pickle files ({path.suffix}) can run arbitrary code when loaded and are "
                            "refused; use a .safetensors version of the hypernetwork, or allow them with "
                            "--allow-pickle (loaded with torch.load(weights_only=True))")
        from tui_diffusion.pipeline.models import load_weights_only

        obj = load_weights_only(path, NodeError)
        if not isinstance(obj, dict):
            raise NodeError(f"{path}: not a hypernetwork (it holds a {type(obj).__name__})")
        return obj
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise NodeError(f"{path}: cannot read it as safetensors: {exc}") from None
    out: dict[Any, Any] = {}
    for key, value in meta.items():
        if key in FLAGS:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
    for key, tensor in sorted(tensors.items(), key=lambda kv: _natural(kv[0])):
        m = _FLAT.match(key)
        if m:
            pair = out.setdefault(int(m.group(1)), [{}, {}])
            pair[int(m.group(2))][m.group(3)] = tensor
    return out


def _natural(key: str) -> tuple:
    """``1.0.linear.10.weight`` after ``1.0.linear.2.weight``: the layers' order, which the MLP is read in."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def build_mlp(weights: dict[str, torch.Tensor], flags: dict[str, Any]) -> torch.nn.Sequential:
    """One MLP as ComfyUI builds it from a state dict in the file's order (see the module's docstring)."""
    act = flags["activation_func"]
    names = [k.removesuffix(".weight") for k in weights if k.endswith(".weight")]
    layers: list[torch.nn.Module] = []
    i = 0
    while i < len(names):
        last, penultimate = i == len(names) - 1, i == len(names) - 2
        w, b = weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"]
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": b})
        layers.append(linear)
        if act != "linear" and (not last or flags["activate_output"]):
            layers.append(ACTIVATIONS[act]())
        if flags["is_layer_norm"]:
            i += 1
            lw, lb = weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"]
            norm = torch.nn.LayerNorm(lw.shape[0])
            norm.load_state_dict({"weight": lw, "bias": lb})
            layers.append(norm)
        if flags["use_dropout"] and not last and (not penultimate or flags["last_layer_dropout"]):
            layers.append(torch.nn.Dropout(p=0.3))
        i += 1
    return torch.nn.Sequential(*layers).float().eval().requires_grad_(False)


def load_hypernetwork(path: Path, allow_pickle: bool = False) -> Hypernetwork:
    """A hypernetwork file; NodeError names the file and says what is wrong."""
    data = _read(path, allow_pickle)
    flags = {k: data.get(k, v) for k, v in FLAGS.items()}
    if flags["activation_func"] is None:  # A1111 writes None for "linear"
        flags["activation_func"] = "linear"
    if flags["activation_func"] not in ACTIVATIONS:
        raise NodeError(f"{path}: activation function {flags['activation_func']!r} is not supported (supported: "
                        f"{', '.join(ACTIVATIONS)})")
    layers: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]] = {}
    try:
        for key, value in data.items():
            if isinstance(key, str) and not key.isdigit():
                continue
            if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(v, dict)
                                                                                  for v in value[:2]):
                raise ValueError(f"width {key} does not hold two state dicts")
            layers[int(key)] = (build_mlp(value[0], flags), build_mlp(value[1], flags))
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise NodeError(f"{path}: not a hypernetwork this program can read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not layers:
        raise NodeError(f"{path}: no hypernetwork layers found (expected attention widths such as 320, 640, 768, "
                        "1280 holding the key and value networks)")
    return Hypernetwork(str(path), layers, flags)


# -- applying -----------------------------------------------------------------------------------------------
def attention_layers(unet: Any) -> list[Any]:
    """The self- and cross-attention layers of a UNet's transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock

    out = []
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            out += [a for a in (module.attn1, module.attn2) if a is not None]
    return out


def fitting_widths(unet: Any, hypernetwork: Hypernetwork) -> set[int]:
    """The hypernetwork's widths that some attention layer of the UNet takes as key input."""
    return {a.to_k.in_features for a in attention_layers(unet)} & set(hypernetwork.layers)


@contextlib.contextmanager
def applied(unet: Any, patches: list[HypernetworkPatch], device: Any, dtype: Any) -> Iterator[None]:
    """The hypernetworks added to the key/value inputs of the UNet's attention while sampling, in the order they
    were loaded (each sees the inputs the ones before it changed, as ComfyUI's patch list)."""
    from tui_diffusion.pipeline.gligen import eager

    active = [p for p in patches if p.strength != 0.0]
    if not active:
        yield
        return
    handles = []
    moved: list[torch.nn.Module] = []

    def hook(mlp: torch.nn.Module, strength: float) -> Any:
        def pre(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x + mlp(x.to(dtype)).to(x.dtype) * strength, *args[1:])

        return pre

    try:
        for attn in attention_layers(unet):
            width = attn.to_k.in_features
            for patch in active:
                pair = patch.hypernetwork.layers.get(width)
                if pair is None:
                    continue
                mlp_k, mlp_v = (m.to(device, dtype) for m in pair)
                moved += [mlp_k, mlp_v]
                handles.append(attn.to_k.register_forward_pre_hook(hook(mlp_k, patch.strength)))
                handles.append(attn.to_v.register_forward_pre_hook(hook(mlp_v, patch.strength)))
        with eager(unet):
            yield
    finally:
        for handle in handles:
            handle.remove()
        if torch.device(device).type != "cpu":  # small, but not left on the accelerator for other models
            for mlp in moved:
                mlp.to("cpu")

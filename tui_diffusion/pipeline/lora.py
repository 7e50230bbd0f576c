"""LoRA files applied as patches: the cached base model is never changed for other jobs.

As in ComfyUI, LoraLoader does not touch weights: it returns the model (and CLIP) with a list of
patches. The sampler and the text encoder add the patches' deltas while they run and restore the
original weights afterwards. Files in the kohya/A1111 layout (``lora_unet_*``, ``lora_te_*``, with
diffusers-style or original-layout module names) and in diffusers/PEFT layouts are understood.

For the SD3/SD3.5 and Flux.1 transformers (the "unet" part here: the denoising network, whatever its kind) the
layouts people have are understood: diffusers' names (``transformer.*``, OneTrainer's ``lora_transformer_*``),
the original names (Stability's ``joint_blocks.*``, Black Forest Labs' ``double_blocks.*``) under
``diffusion_model.`` or with no prefix, kohya's ``lora_unet_*`` of the original names, and XLabs' processor LoRAs
(USO's DiT LoRA). A LoRA named in the original layout patches diffusers' layers as ComfyUI patches the original
ones: ``lora_dit`` reads off the model where each original layer's rows went (a fused ``qkv`` into ``to_q``,
``to_k``, ``to_v``). Black Forest Labs' control LoRAs (Depth/Canny dev LoRAs) also carry biases (``lora_B.bias``,
ComfyUI's ``diff_b``), full norm scales (``set_weight``) and an ``img_in`` of twice the input channels
(``reshape_weight``): the input layer is widened with zeros while the patch is on (the model then takes the
conditioning image's latent beside the noise, as the full Canny/Depth models do), and put back afterwards.
ComfyUI's whole-weight deltas (``diff``) are added as bias deltas are. Text-encoder layers (``lora_te1_*``,
``text_encoders.clip_l.*``) reach SD3's and Flux's encoders under the names ComfyUI gives them (``_aliased``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline import lora_dit
from tui_diffusion.pipeline.checkpoint_writer import unet_original_key
from tui_diffusion.pipeline.errors import NodeError


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA file's low-rank pairs, by normalised module key (``unet:down_blocks.0...``), and what a control
    LoRA adds besides them."""

    source: str
    #: module key -> (down [r, in...], up [out, r...], alpha or None)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]
    #: parameter key (``unet:double_blocks.0.img_attn.qkv.bias``) -> a full delta for it, scaled by the strength:
    #: biases (BFL's ``lora_B.bias``, ComfyUI's ``diff_b``) and weights (ComfyUI's ``diff``)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: parameter key (``unet:double_blocks.0.img_attn.norm.key_norm.scale``) -> its value while patched
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    #: module key -> the weight shape it is widened to, zeros added (``reshape_weight``)
    reshapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Patch:
    lora: LoraWeights
    strength: float


#: a key's ending -> what it holds (the longest ending that fits wins)
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_down", "down"), (".lora_up", "up"),
    (".lora_A", "down"), (".lora_B", "up"), (".lora_B.bias", "bias"), (".diff_b", "bias"), (".diff", "diff"),
    (".alpha", "alpha"), (".set_weight", "set"), (".reshape_weight", "reshape"),
)
#: a key's prefix -> the model part it patches, and whether the name after it is kohya's (dots as underscores)
_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("lycoris_", "unet"), ("lora_te1_", "te1"),
    ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    # ComfyUI's own names of the text encoders (its LoRA trainer's files)
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_h.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"), ("text_encoders.t5xxl.transformer.", "t5xxl"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
    ("base_model.model.", "unet"), ("transformer.", "unet"), ("unet.", "unet"), ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
)
#: XLabs' processor LoRAs (and USO's, which ComfyUI converts the same way) -> the original Flux layers they patch;
#: ``linear1_qkv`` is the q, k, v rows of a single block's ``linear1``
XLABS_LAYERS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
                "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1_qkv", "proj_lora": "linear2"}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(part, name, what) of a LoRA file's key; None for a key this program does not read."""
    what = None
    for suffix, kind in sorted(_SUFFIXES, key=lambda s: -len(s[0])):
        if key.endswith(suffix):
            stem, what = key[: -len(suffix)], kind
            break
    else:  # full values without a LoRA suffix: the norm scales of BFL's control LoRAs (and diffusers' version)
        if key.endswith("_norm.scale") or (key.endswith(".weight") and ".norm" in key and "lora" not in key):
            stem, what = key, "set"
        else:
            return None
    for prefix, part in _PREFIXES:
        if stem.startswith(prefix):
            return part, stem[len(prefix):], what
    return "unet", stem, what  # Black Forest Labs' files: the original names, no prefix


def _xlabs_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs' keys under the original layers' names: ``double_blocks.0.processor.qkv_lora1.down.weight`` as
    ``double_blocks.0.img_attn.qkv.lora_down.weight``."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "processor" in parts and len(parts) >= 3 and parts[-2] in ("down", "up"):
            i = parts.index("processor")
            layer = XLABS_LAYERS.get(parts[i + 1]) if i + 1 < len(parts) else None
            if layer is not None:
                key = ".".join([*parts[:i], layer, f"lora_{parts[-2]}", parts[-1]])
        out[key] = value
    return out


def load_lora(path: Path) -> LoraWeights:
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors LoRA files are supported")
    read_header(path)  # refuse a lying or truncated file before reading tensors
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read this LoRA: {exc}") from None
    return parse_lora(state, path)


def parse_lora(state: dict[str, torch.Tensor], path: Path) -> LoraWeights:
    """A LoRA file's tensors, by the keys of the model parts they patch (see the module docstring)."""
    if any(".processor." in k for k in state):
        state = _xlabs_names(state)
    entries: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        found = _split_key(key)
        if found is None:
            continue
        part, name, what = found
        entries.setdefault(f"{part}:{name}", {})[what] = tensor
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    diffs: dict[str, torch.Tensor] = {}
    sets: dict[str, torch.Tensor] = {}
    reshapes: dict[str, tuple[int, ...]] = {}
    for key, v in entries.items():
        if "down" in v and "up" in v:
            pairs[key] = (v["down"].float(), v["up"].float(), float(v["alpha"]) if "alpha" in v else None)
        if "bias" in v:
            diffs[f"{key}.bias"] = v["bias"].float()
        if "diff" in v:
            diffs[f"{key}.weight"] = v["diff"].float()
        if "set" in v:
            name = key if key.endswith((".scale", ".weight", ".bias")) else key + ".weight"
            sets[name] = v["set"].float()
        if "reshape" in v:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                reshapes[key] = tuple(int(x) for x in v["reshape"].reshape(-1).tolist())
    if not pairs and not diffs:
        raise CheckpointError(f"{path}: no LoRA weights found (expected kohya 'lora_unet_*', diffusers "
                              "'transformer.*'/'unet.*' or original 'diffusion_model.*' keys)")
    if sets:  # a control LoRA: its input layer reads more channels than the model's (ComfyUI's converter's rule)
        for key in ("unet:img_in", "unet:x_embedder"):
            if key in pairs and key not in reshapes:
                down, up, _ = pairs[key]
                reshapes[key] = (int(up.shape[0]), int(down.flatten(1).shape[1]))
    return LoraWeights(str(path), pairs, diffs, sets, reshapes)


def _targets(module: torch.nn.Module, part: str, with_original_names: bool) -> dict[str, torch.nn.Module]:
    """Every layer a LoRA may name, under its dotted and its underscored name (kohya), for one model part."""
    out: dict[str, torch.nn.Module] = {}
    # the original (LDM) names of an SD UNet's layers; a transformer's original names are ``lora_dit``'s
    layers = getattr(getattr(module, "config", None), "layers_per_block", None)
    with_original_names = with_original_names and layers is not None
    for name, mod in module.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        names = {name, "text_model." + name if part != "unet" and not name.startswith("text_model.") else name}
        if with_original_names:
            with contextlib.suppress(KeyError, ValueError, IndexError, TypeError):
                original = unet_original_key(name + ".weight", layers)
                if original:
                    names.add(original.removesuffix(".weight"))
        for n in names:
            out[f"{part}:{n}"] = mod
            out[f"{part}:{n.replace('.', '_')}"] = mod
    return out


def _fits(mod: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, width: int | None = None) -> bool:
    """Whether a pair fits a layer: its rows, and its columns (or the ``width`` the layer is widened to)."""
    weight = mod.weight
    columns = weight.flatten(1).shape[1] if width is None else width
    return up.shape[0] == weight.shape[0] and down.flatten(1).shape[1] == columns


def _delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, weight: torch.Tensor) -> torch.Tensor:
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(weight.shape)


@dataclass
class _Plan:
    """What one LoRA does to one set of model parts."""

    #: (layer, down, up, alpha, the width the layer must have first or None)
    pairs: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float | None, int | None]]
    #: the file's pairs that fit completely
    matched: int
    #: (parameter, its rows, the delta or value for them)
    diffs: list[tuple[torch.Tensor, slice, torch.Tensor]]
    sets: list[tuple[torch.Tensor, slice, torch.Tensor]]


def _width(lora: LoraWeights, key: str, mod: torch.nn.Module) -> int | None:
    """The input width a reshape asks for, if it only widens this layer's input (what control LoRAs do)."""
    shape = lora.reshapes.get(key)
    if shape is None or len(shape) != 2 or not isinstance(mod, torch.nn.Linear):
        return None
    if shape[0] != mod.weight.shape[0] or shape[1] < mod.weight.shape[1]:
        return None
    return shape[1]


def _aliased(parts: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """SD3's and Flux's text encoders under the names LoRA files give them, as ComfyUI maps them: te1 is CLIP-L;
    te2 is CLIP-G (SD3) or T5 (Flux, which has no CLIP-G); te3 is SD3's T5 (OneTrainer)."""
    if "te1" in parts or "clip_l" not in parts:
        return parts
    out = dict(parts)
    out["te1"] = parts["clip_l"]
    second = parts.get("clip_g", parts.get("t5xxl"))
    if second is not None:
        out["te2"] = second
    if "clip_g" in parts and "t5xxl" in parts:
        out["te3"] = parts["t5xxl"]
    return out


def _plan(parts: dict[str, torch.nn.Module], lora: LoraWeights,
          tables: dict[str, dict[str, torch.nn.Module]] | None = None) -> _Plan:
    parts = _aliased(parts)
    tables = tables if tables is not None else {part: _targets(m, part, part == "unet") for part, m in parts.items()}
    plan = _Plan([], 0, [], [])
    for key, (down, up, alpha) in lora.pairs.items():
        part, _, name = key.partition(":")
        net = parts.get(part)
        if net is None:
            continue
        mod = tables.get(part, {}).get(key)
        if mod is not None:
            width = _width(lora, key, mod)
            if _fits(mod, down, up, width):
                plan.pairs.append((mod, down, up, alpha, width))
                plan.matched += 1
            continue
        cut = lora_dit.layer_pairs(net, name, down, up)
        if not cut:
            continue
        width = _width(lora, key, cut[0][0]) if len(cut) == 1 else None
        if all(_fits(m, down, u, width) for m, u in cut):
            plan.pairs.extend((m, down, u, alpha, width) for m, u in cut)
            plan.matched += 1
    for values, out in ((lora.diffs, plan.diffs), (lora.sets, plan.sets)):
        for key, value in values.items():
            out.extend(_param_rows(parts, tables, key, value))
    return plan


def _param_rows(parts: dict[str, torch.nn.Module], tables: dict[str, dict[str, torch.nn.Module]], key: str,
                value: torch.Tensor) -> list[tuple[torch.Tensor, slice, torch.Tensor]]:
    """(parameter, its rows, the value's rows for them) for a full-tensor entry named by a layer the tables know
    (any layout's layer name), by a parameter's own name, or by an original transformer parameter's name."""
    part, _, name = key.partition(":")
    if part not in parts:
        return []
    layer, _, leaf = name.rpartition(".")
    mod = tables.get(part, {}).get(f"{part}:{layer}")
    param = getattr(mod, leaf, None) if mod is not None else None
    if param is None:
        with contextlib.suppress(AttributeError):
            param = parts[part].get_parameter(name)
    if isinstance(param, torch.Tensor) and param.shape == value.shape:
        return [(param, slice(None), value)]
    return [(p, rows, value[source]) for p, rows, source in lora_dit.param_rows(parts[part], name) or ()]


def layer_pairs(module: torch.nn.Module, part: str,
                lora: LoraWeights) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float | None]]:
    """The (layer, down, up, alpha) pairs a LoRA adds to one model part, as ``patched`` applies them (merges read
    them to evaluate another model's LoRAs)."""
    plan = _plan({part: module}, lora)
    return [(m, d, u, a) for m, d, u, a, _ in plan.pairs]


def _add(param: torch.Tensor, rows: slice, delta: torch.Tensor) -> None:
    target = param[rows]
    if param.dtype == torch.float32:
        target.add_(delta.to(param.device))
    else:  # half precision or fp8 storage (which has no addition): add in float32, round once
        target.copy_((target.float() + delta.to(param.device, torch.float32)).to(param.dtype))


#: a widened layer -> the config value that says its width (diffusers' own table where it has one)
def _width_attributes() -> dict[str, str]:
    try:
        from diffusers.loaders.lora_pipeline import _MODULE_NAME_TO_ATTRIBUTE_MAP_FLUX as table
    except ImportError:  # pragma: no cover - older or newer diffusers
        table = {"x_embedder": "in_channels"}
    return dict(table)


def _widen(parts: dict[str, torch.nn.Module], mod: torch.nn.Linear, width: int,
           undo: list[tuple[torch.nn.Module, str, Any, Any]]) -> None:
    """Give a linear layer ``width`` input features, the new columns zero (ComfyUI pads the weight; diffusers
    expands the layer the same way), remembering what to put back."""
    old = mod.weight
    if old.shape[1] >= width:
        return
    if old.device.type == "meta":
        raise NodeError("LoRAs cannot be applied with --novram (layer-by-layer offload) yet; use --lowvram")
    wide = torch.zeros(old.shape[0], width, dtype=old.dtype, device=old.device)
    wide[:, : old.shape[1]] = old.detach()
    undo.append((mod, "weight", old, None))
    undo.append((mod, "in_features", mod.in_features, None))
    mod.weight = torch.nn.Parameter(wide, requires_grad=old.requires_grad)
    mod.in_features = width
    for net in parts.values():
        config = getattr(net, "config", None)
        for attribute, setting in _width_attributes().items():
            if getattr(net, attribute, None) is mod and config is not None and hasattr(config, setting):
                undo.append((config, setting, getattr(config, setting), None))
                setattr(config, setting, width)


@contextlib.contextmanager
def patched(parts: dict[str, torch.nn.Module], patches: list[Patch]) -> Iterator[None]:
    """Add the patches' deltas to the named model parts, and restore the weights on the way out."""
    active = [p for p in patches if p.strength != 0.0]
    if not active:
        yield
        return
    tables: dict[str, dict[str, torch.nn.Module]] = {}  # built for the first LoRA
    #: id(parameter) -> (parameter, its value before any patch)
    backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    #: (object, attribute, value before) of layers widened by a control LoRA, put back last
    undo: list[tuple[Any, str, Any, Any]] = []

    def backup(param: torch.Tensor) -> None:
        if param.device.type == "meta":
            raise NodeError("LoRAs cannot be applied with --novram (layer-by-layer offload) yet; use --lowvram")
        if id(param) not in backups:
            backups[id(param)] = (param, param.detach().clone())

    try:
        # inference mode, not just no_grad: a layer kept in fp8 and cast around each call (diffusers' layerwise
        # casting) gets its weights back as inference tensors after a sampling run, which only inference mode
        # may change in place
        with torch.inference_mode():
            for patch in active:
                if not isinstance(patch, Patch):  # a merge (pipeline/merge.py) sets what it changes itself
                    patch.apply(parts, backups)
                    continue
                if not tables:
                    tables = {part: _targets(module, part, part == "unet")
                              for part, module in _aliased(parts).items()}
                plan = _plan(parts, patch.lora, tables)
                for mod, down, up, alpha, width in plan.pairs:
                    if width is not None:
                        _widen(parts, mod, width, undo)
                    backup(mod.weight)
                    _add(mod.weight, slice(None), _delta(down, up, alpha, mod.weight) * patch.strength)
                for param, rows, delta in plan.diffs:
                    backup(param)
                    _add(param, rows, delta * patch.strength)
                for param, rows, value in plan.sets:  # ComfyUI's "set": the value, whatever the strength
                    backup(param)
                    param[rows] = value.to(param.device, param.dtype)
        yield
    finally:
        with torch.inference_mode():
            for param, original in backups.values():
                if param.shape == original.shape:
                    param.copy_(original)
            for obj, attribute, value, _ in reversed(undo):
                setattr(obj, attribute, value)


def matched_modules(parts: dict[str, torch.nn.Module], lora: LoraWeights) -> int:
    """How many of the file's pairs fit these model parts completely (a pair for a fused original layer counts
    once)."""
    return _plan(parts, lora).matched

"""Model merges as patches: the merged model is model1 plus a note of how to blend model2 into it.

As in ComfyUI (``ModelPatcher.add_patches`` with the other model's weights as a "diff" patch), a merge never
copies a model: ``ModelMergeSimple`` returns model1's handle with a ``MergePatch`` appended to its patches.
While the merged model samples (or its CLIP encodes), ``lora.patched`` sets each parameter in place to

    weight * keep + other_weight * take

after the patches before it, and restores every parameter on the way out, so the cached models stay as
loaded. ``other_weight`` is the other model's parameter with the other model's own patches (LoRAs, merges)
evaluated one tensor at a time, from its unpatched weights, so merging a model with a patched copy of itself
works. ComfyUI's nodes give (keep, take) = (ratio, 1 - ratio) for the Simple/Blocks merges, (1, 1) for Add
and (m, -m) for Subtract. A parameter whose shape differs between the two models (an inpainting UNet's input)
is only multiplied by ``keep``, which is what ComfyUI's patch arithmetic does with it (it warns "WEIGHT NOT
MERGED"); one the other model lacks is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tui_diffusion.pipeline.checkpoint_writer import unet_to_original
from tui_diffusion.pipeline.errors import NodeError

#: CLIP parameters ComfyUI's CLIP merges leave alone
CLIP_SKIP = (".position_ids", ".logit_scale")


@dataclass(frozen=True, eq=False)
class MergePatch:
    """Blend another model's parameters into this one's while it runs (see the module docstring)."""

    #: the other model's parts, by the names ``lora.patched`` uses ("unet"; "te1", "te2"; DiT CLIP names)
    other: Mapping[str, torch.nn.Module]
    #: the other model's own patches, evaluated on its weights before they are blended in
    other_patches: tuple = ()
    keep: float = 1.0
    take: float = 0.0
    #: (keep, take) for particular parameters, keyed "part:name" (ModelMergeBlocks and the per-block nodes)
    per_name: Mapping[str, tuple[float, float]] | None = None
    #: parameter-name endings left alone
    skip: tuple[str, ...] = ()

    def coefficients(self, part: str, name: str) -> tuple[float, float]:
        if self.per_name is not None:
            found = self.per_name.get(f"{part}:{name}")
            if found is not None:
                return found
        return self.keep, self.take

    @property
    def strength(self) -> float:
        """Non-zero when the patch changes anything: ``lora.patched`` and the compiled-UNet check read it."""
        pairs = [(self.keep, self.take), *(self.per_name or {}).values()]
        return 0.0 if all(k == 1.0 and t == 0.0 for k, t in pairs) else 1.0

    @torch.no_grad()
    def apply(self, parts: Mapping[str, torch.nn.Module],
              backups: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Blend in place (called by ``lora.patched``, which restores what ``backups`` holds afterwards)."""
        memo: dict[Any, Any] = {}
        for part, module in parts.items():
            if part not in self.other:
                continue
            for name, param in module.named_parameters():
                if name.endswith(self.skip):
                    continue
                keep, take = self.coefficients(part, name)
                if keep == 1.0 and take == 0.0:
                    continue
                if param.device.type == "meta":
                    raise NodeError("model merges cannot be applied with --novram (layer-by-layer offload) yet; "
                                    "use --lowvram")
                if id(param) not in backups:  # first: the other model may be this very module (read unpatched)
                    backups[id(param)] = (param, param.detach().clone())
                source = effective_weight(self.other, self.other_patches, part, name, backups, memo)
                if source is None:  # the other model has no such weight: no patch for it, as in ComfyUI
                    continue
                if source.shape != param.shape:  # ComfyUI scales, then finds it cannot add ("NOT MERGED")
                    param.mul_(keep)
                    continue
                if param.dtype == torch.float32:
                    param.mul_(keep).add_(source.to(param.device, torch.float32), alpha=take)
                else:  # half precision: blend in float32, as ComfyUI patches weights, then round once
                    blended = param.float() * keep + source.to(param.device, torch.float32) * take
                    param.copy_(blended.to(param.dtype))


def _parameters(module: torch.nn.Module, memo: dict[Any, Any]) -> dict[str, torch.nn.Parameter]:
    key = ("params", id(module))
    if key not in memo:
        memo[key] = dict(module.named_parameters())
    return memo[key]


def _lora_pairs(module: torch.nn.Module, part: str, lora: Any, memo: dict[Any, Any]) -> dict[int, list[tuple]]:
    """A LoRA's (down, up, alpha) pairs by the id of the layer they change, as ``lora.patched`` matches them."""
    from tui_diffusion.pipeline.lora import layer_pairs

    key = ("lora", id(lora), part, id(module))
    if key not in memo:
        by_layer: dict[int, list[tuple]] = {}
        for layer, down, up, alpha in layer_pairs(module, part, lora):
            by_layer.setdefault(id(layer), []).append((down, up, alpha))
        memo[key] = by_layer
    return memo[key]


def effective_weight(parts: Mapping[str, torch.nn.Module], patches: tuple, part: str, name: str,
                     backups: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                     memo: dict[Any, Any] | None = None) -> torch.Tensor | None:
    """One parameter of a model as its patches make it, computed without changing the model; None if it has no
    such parameter. Reads the unpatched value from ``backups`` when the module is patched in place right now."""
    from tui_diffusion.pipeline.lora import _delta

    memo = {} if memo is None else memo
    module = parts.get(part)
    param = _parameters(module, memo).get(name) if module is not None else None
    if param is None:
        return None
    entry = backups.get(id(param))
    weight = entry[1] if entry is not None else param.detach()
    active = [p for p in patches if p.strength != 0.0]
    if not active:
        return weight
    weight = weight.float()
    layer_name, _, leaf = name.rpartition(".")
    for patch in active:
        if isinstance(patch, MergePatch):
            if name.endswith(patch.skip):
                continue
            keep, take = patch.coefficients(part, name)
            source = effective_weight(patch.other, patch.other_patches, part, name, backups, memo)
            if source is not None:
                weight = weight * keep
                if source.shape == weight.shape:
                    weight = weight + source.to(weight.device, torch.float32) * take
        elif leaf == "weight":  # a LoRA (lora.Patch) changes layer weights only
            layer = module.get_submodule(layer_name) if layer_name else module
            for down, up, alpha in _lora_pairs(module, part, patch.lora, memo).get(id(layer), ()):
                weight = weight + _delta(down, up, alpha, weight).to(weight.device) * patch.strength
    return weight


# -- ComfyUI's block names ------------------------------------------------------------------------------------
def unet_block_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers parameter name -> its name in the original (LDM) layout (``input_blocks.4.1.proj_in.weight``),
    which ComfyUI's ModelMergeBlocks/SD1/SDXL inputs are prefixes of; empty for a network that is not an SD
    UNet (SD3/Flux transformers: every parameter then takes the default ratio, as in ComfyUI)."""
    config = getattr(unet, "config", None)
    layers = getattr(config, "layers_per_block", None)
    if not isinstance(layers, int):
        return {}
    names = [n for n, _ in unet.named_parameters()]
    try:
        original = unet_to_original({n: n for n in names}, layers)
    except (KeyError, ValueError, IndexError):
        return {}
    return {diffusers: ldm.removeprefix("model.diffusion_model.") for ldm, diffusers in original.items()}


def block_ratio(original_name: str | None, ratios: Mapping[str, float]) -> float:
    """ComfyUI's ModelMergeBlocks rule: the longest input name the original name starts with gives the ratio;
    none does: the first input's."""
    items = list(ratios.items())
    ratio, best = items[0][1], 0
    if original_name is not None:
        for prefix, value in items:
            if original_name.startswith(prefix) and len(prefix) > best:
                ratio, best = value, len(prefix)
    return ratio


def block_merge(unet: torch.nn.Module, ratios: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """(keep, take) per UNet parameter ("unet:name") for per-block ratios (model1's share, 0..1)."""
    names = unet_block_names(unet)
    out = {}
    for name, _ in unet.named_parameters():
        ratio = block_ratio(names.get(name), ratios)
        out[f"unet:{name}"] = (ratio, 1.0 - ratio)
    return out


def shared_parameters(parts: Mapping[str, torch.nn.Module], other: Mapping[str, torch.nn.Module]) -> tuple[int, int]:
    """Of the first model's parameters in the parts both models have, how many the other has under the same name
    and shape, and how many there are."""
    shared = total = 0
    for part, module in parts.items():
        if part not in other:
            continue
        theirs = {n: p.shape for n, p in other[part].named_parameters()}
        for name, param in module.named_parameters():
            total += 1
            shared += theirs.get(name) == param.shape
    return shared, total


def check_same_architecture(parts: Mapping[str, torch.nn.Module], other: Mapping[str, torch.nn.Module],
                            first: str, second: str) -> None:
    """Refuse a merge of different architectures (SD1.x with SDXL, say: ComfyUI would blend the few layers that
    happen to fit and warn about the rest). A few layers of another shape, an inpainting UNet's input, are
    allowed (see the module docstring for what happens to them)."""
    shared, total = shared_parameters(parts, other)
    if total == 0 or shared < 0.9 * total:
        raise NodeError(f"{second}: only {shared} of the {total} weights of {first} have a counterpart of the same "
                        f"name and shape in {second}: merge models of the same architecture")

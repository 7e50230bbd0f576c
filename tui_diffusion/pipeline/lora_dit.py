"""Where a LoRA named in the original layout of an SD3/SD3.5 MMDiT or a Flux.1 transformer lands in diffusers' model.

ComfyUI patches these transformers in their original layout (Stability's ``joint_blocks.*``, Black Forest Labs'
``double_blocks.*``/``single_blocks.*``); this program runs diffusers' models, whose layers are cut differently: a
fused ``qkv`` is three layers (``to_q``, ``to_k``, ``to_v``), a single block's ``linear1`` is those three and
``proj_mlp``, the final modulation's halves are swapped. Rather than a second key table, the map is read off the
model itself: every row of every parameter gets a number, the project's own diffusers-to-original converter
(``checkpoint_writer_dit.sd3_to_original``/``flux_to_original``, tested against diffusers' converters) moves the
numbers as it moves weights, and the numbers found under an original name say which rows of which diffusers
parameters it is made of. A LoRA pair for an original layer then becomes pairs for diffusers' layers: the same
down matrix, the up matrix's rows placed where the layer's rows went (``up @ down`` is cut by rows exactly as the
weight is), so the patched model equals ComfyUI's patched weights converted by the loader.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

#: original names of the layer groups diffusers does not have as one layer, beyond the converter's own:
#: ComfyUI's ``linear1_qkv`` (USO/XLabs LoRAs: only the q, k, v rows of a Flux single block's ``linear1``)
_QKV_ONLY = ("linear1", "linear1_qkv", 3)


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of an original parameter are rows ``dst:dst + stop - start`` of diffusers' ``name``."""

    name: str
    start: int
    stop: int
    dst: int


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, list[Segment]]] = weakref.WeakKeyDictionary()


def kind(net: Any) -> str | None:
    """"flux" or "sd3" for diffusers' Flux/SD3 transformers (the classes this program loads them as, or a subclass),
    else None."""
    kinds = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
    return next((kinds[c.__name__] for c in type(net).__mro__ if c.__name__ in kinds), None)


class _Tags(dict):
    """Numbered rows by diffusers parameter name; a name the model lacks reads as one row that maps nowhere."""

    def __missing__(self, key: str) -> torch.Tensor:
        return torch.tensor([-1], dtype=torch.int64)


def original_map(net: torch.nn.Module) -> dict[str, list[Segment]]:
    """Original parameter name (no prefix: ``double_blocks.0.img_attn.qkv.weight``) -> the diffusers rows it is
    made of; empty for a model that is not an SD3 or Flux transformer. Computed once per model."""
    if net in _CACHE:
        return _CACHE[net]
    family = kind(net)
    if family is None:
        return {}
    from tui_diffusion.pipeline.checkpoint_writer_dit import flux_to_original, sd3_to_original

    names, starts, tags, total = [], [], _Tags(), 0
    for name, tensor in net.state_dict().items():
        rows = int(tensor.shape[0]) if tensor.ndim else 1
        names.append(name)
        starts.append(total)
        tags[name] = torch.arange(total, total + rows, dtype=torch.int64)
        total += rows
    config: Any = net.config
    if family == "flux":
        moved = flux_to_original(tags, int(config.num_layers), int(config.num_single_layers))
    else:
        moved = sd3_to_original(tags, int(config.num_layers), prefix="")
    first = torch.tensor(starts, dtype=torch.int64)
    table: dict[str, list[Segment]] = {}
    for original, numbers in moved.items():
        numbers = numbers.reshape(-1)
        which = torch.searchsorted(first, numbers, right=True) - 1
        # a new segment wherever the parameter changes or the rows stop being consecutive
        breaks = torch.ones(len(numbers), dtype=torch.bool)
        breaks[1:] = (which[1:] != which[:-1]) | (numbers[1:] != numbers[:-1] + 1)
        edges = [*torch.nonzero(breaks).reshape(-1).tolist(), len(numbers)]
        segments = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            if int(numbers[a]) < 0:
                continue
            param = int(which[a])
            segments.append(Segment(names[param], a, b, int(numbers[a]) - starts[param]))
        if segments:
            table[original] = segments
    _add_qkv_only(table)
    for name in list(table):  # kohya's names: the layer's dots are underscores
        layer, _, leaf = name.rpartition(".")
        table.setdefault(f"{layer.replace('.', '_')}.{leaf}", table[name])
    _CACHE[net] = table
    return table


def _add_qkv_only(table: dict[str, list[Segment]]) -> None:
    whole, part, count = _QKV_ONLY
    for name in [n for n in table if f".{whole}." in n]:
        segments = table[name][:count]
        table[name.replace(f".{whole}.", f".{part}.")] = segments


def _lookup(table: dict[str, list[Segment]], name: str) -> list[Segment] | None:
    """An original parameter by its dotted name or by kohya's underscored layer name
    (``double_blocks_0_img_attn_qkv.weight``)."""
    return table.get(name)


def layer_pairs(net: torch.nn.Module, layer: str, down: torch.Tensor,
                up: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]] | None:
    """The (diffusers layer, up matrix) pairs of a LoRA pair named by an original layer (``up @ down`` of each is
    that layer's share of the original's delta; rows it does not reach are zero); None if the model has no such
    layer or the up matrix has another number of rows."""
    segments = _lookup(original_map(net), layer + ".weight")
    if not segments or up.shape[0] != segments[-1].stop - segments[0].start:
        return None
    out: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    base = segments[0].start
    for seg in segments:
        module: Any = net.get_submodule(seg.name.rpartition(".")[0])
        if module.weight.shape[0] < seg.dst + seg.stop - seg.start:
            return None
        if seg.name not in out:
            out[seg.name] = (module, up.new_zeros(module.weight.shape[0], *up.shape[1:]))
        out[seg.name][1][seg.dst:seg.dst + seg.stop - seg.start] = up[seg.start - base:seg.stop - base]
    return list(out.values())


def param_rows(net: torch.nn.Module, name: str) -> list[tuple[torch.nn.Parameter, slice, slice]] | None:
    """An original parameter (a bias, a norm's scale) as (diffusers parameter, its rows, the original's rows)."""
    table = original_map(net)
    segments = _lookup(table, name)
    if segments is None and name.endswith(".weight"):  # ComfyUI's newer norms are "weight" where BFL's are "scale"
        segments = _lookup(table, name.removesuffix(".weight") + ".scale")
    if not segments:
        return None
    base = segments[0].start
    out = []
    for seg in segments:
        param = net.get_parameter(seg.name)
        out.append((param, slice(seg.dst, seg.dst + seg.stop - seg.start), slice(seg.start - base, seg.stop - base)))
    return out

"""Opt-in step caching: diffusers' cache hooks skip work that barely changes from one sampling step to the next.

Beyond what ComfyUI ships without custom nodes. Two of diffusers' hooks are offered:

- ``first_block_cache`` (First Block Cache, after TeaCache): the first transformer block always runs; when its
  output moved less than ``threshold`` (relative mean absolute change) since the last full step, the other
  blocks are skipped and their last residual reused. Transformers only (SD3.x, Flux.1): a UNet has no single
  chain of blocks to cut. SD3's last block returns no text stream, which diffusers' hook cannot take as the
  tail, so there the cache spans the blocks before it and the last block always runs.
- ``taylorseer`` (TaylorSeer): full steps every ``interval`` calls after ``warmup`` full ones; in between the
  outputs are extrapolated from the last full steps (first-order Taylor series). On a transformer the whole
  block stack is skipped and the output projection extrapolated (diffusers' "lite" mode; SD3's last block
  still runs, for the same reason); on a UNet the attention and feed-forward layers of its transformer
  blocks are.

diffusers' FasterCache is left out: its unconditional-branch skip assumes one conditional and one
unconditional row per image (ConditioningCombine breaks that), its attention reuse needs per-model timestep
ranges and weights, and on the tiny SD3/Flux models it was no faster.

The cache is a property of the MODEL as the ApplyStepCache node returns it (or of every model, with the
``step_cache`` setting); the hooks are attached to the shared network only while one sampler runs and removed
afterwards, so the loaded model in the cache is the same network for every other job. Hook state is kept per
kind of call (its input shape, and its place among that step's calls of that shape: a batched cond/uncond
call, each area conditioning's crop), so different calls never reuse each other's work.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.settings import STEP_CACHE_METHODS

__all__ = ["STEP_CACHE_METHODS", "StepCache", "applicable", "step_cache_applied"]

#: names of the block lists diffusers' transformers keep their blocks in
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: a UNet's transformer-block layers TaylorSeer extrapolates
_UNET_TAYLOR = (r".*attentions\.\d+\.transformer_blocks\.\d+\.(attn1|attn2|ff)",)


@dataclass(frozen=True)
class StepCache:
    """How a model's sampling steps are cached (frozen: part of the MODEL a node outputs)."""

    method: str = "first_block_cache"
    #: first_block_cache: how much the first block's output may change before the rest runs again
    threshold: float = 0.1
    #: taylorseer: a full step every ``interval`` calls of the network
    interval: int = 3
    #: taylorseer: full calls before any is skipped
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.method not in STEP_CACHE_METHODS:
            raise NodeError(f"step cache {self.method!r} is not one of {', '.join(STEP_CACHE_METHODS)}")


def _is_transformer(net: Any) -> bool:
    return any(isinstance(getattr(net, name, None), torch.nn.ModuleList) for name in _BLOCK_LISTS)


def _blocks(net: Any) -> list[torch.nn.Module]:
    return [b for name in _BLOCK_LISTS if isinstance(getattr(net, name, None), torch.nn.ModuleList)
            for b in getattr(net, name)]


def applicable(net: Any, method: str) -> str | None:
    """None when ``method`` can cache ``net``; else why not, in words for an error message."""
    if method == "none":
        return None
    name = type(net).__name__
    if method == "first_block_cache":
        if not _is_transformer(net):
            return (f"{method} applies to transformer models (SD3.x, Flux.1), not to a {name}; "
                    "use taylorseer for SD1.x/SD2.x/SDXL UNets")
        from diffusers.hooks._helpers import TransformerBlockRegistry

        blocks = _cacheable_blocks(net)
        if len(blocks) < 2:
            return f"first_block_cache needs at least 2 transformer blocks; this {name} has {len(blocks)}"
        try:
            for block in blocks:
                TransformerBlockRegistry.get(type(block))
        except ValueError:
            return f"diffusers' first_block_cache does not know the blocks of a {name}"
        return None
    if method == "taylorseer":
        if _is_transformer(net) and hasattr(net, "proj_out"):
            return None
        patterns = [re.compile(p) for p in _UNET_TAYLOR]
        if any(p.fullmatch(n) for n, _ in net.named_modules() for p in patterns):
            return None
        return f"taylorseer found no layers it knows in a {name}"
    return f"unknown step cache {method!r}"


def _cacheable_blocks(net: Any) -> list[torch.nn.Module]:
    """The blocks a cache may skip: all but a last block that returns no text stream (SD3's
    ``context_pre_only`` block), which diffusers' hooks cannot take as a tail."""
    blocks = _blocks(net)
    if blocks and getattr(blocks[-1], "context_pre_only", False):
        blocks = blocks[:-1]
    return blocks


class _Blocks(torch.nn.Module):
    """A stand-in holding the cacheable blocks (the same modules) under a name diffusers' hooks look for, so
    the hooks land on the real blocks without the last one."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(blocks)


def _apply(net: Any, cache: StepCache) -> None:
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )

    if cache.method == "first_block_cache":
        apply_first_block_cache(_Blocks(_cacheable_blocks(net)), FirstBlockCacheConfig(threshold=cache.threshold))
        return
    common = {"cache_interval": cache.interval, "disable_cache_before_step": cache.warmup,
              "taylor_factors_dtype": torch.float32}
    if not _is_transformer(net):  # a UNet: its transformer blocks' attention and feed-forward layers
        apply_taylorseer_cache(net, TaylorSeerCacheConfig(**common, cache_identifiers=list(_UNET_TAYLOR)))
        return
    # skipped blocks give zeros of their recorded shapes, the output projection is extrapolated
    cacheable = {id(block) for block in _cacheable_blocks(net)}
    skipped = [re.escape(f"{name}.{i}") for name in _BLOCK_LISTS
               if isinstance(getattr(net, name, None), torch.nn.ModuleList)
               for i, block in enumerate(getattr(net, name)) if id(block) in cacheable]
    apply_taylorseer_cache(net, TaylorSeerCacheConfig(**common, skip_predict_identifiers=skipped,
                                                      cache_identifiers=["proj_out"]))


def _remove(net: Any) -> None:
    """Take every cache hook off the network (and its blocks), leaving it as it was loaded."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    registry = HookRegistry.check_if_exists_or_initialize(net)
    for hook in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK, _TAYLORSEER_CACHE_HOOK):
        registry.remove_hook(hook, recurse=True)
    registry.invalidate_child_registries_cache()


@contextlib.contextmanager
def step_cache_applied(net: Any, cache: StepCache | None) -> Iterator[None]:
    """``net`` with ``cache``'s hooks for the duration of one sampling run (fresh state each run)."""
    if cache is None or cache.method == "none":
        yield
        return
    why = applicable(net, cache.method)
    if why is not None:
        raise NodeError(f"step cache: {why}")
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    calls: dict[tuple, int] = {}

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        # one state per kind of call: its input shape and its place among the calls of that shape at this
        # timestep (area conditionings of one size are evaluated one after the other, in the same order)
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
        when = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else None
        nth = calls.get((shape, when), 0)
        calls[(shape, when)] = nth + 1
        _set_cache_context(net, CacheContext(f"{'x'.join(str(d) for d in shape)}#{nth}"))

    _apply(net, cache)
    handle = net.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        _set_cache_context(net, None)
        _remove(net)


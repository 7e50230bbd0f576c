"""The node implementations, registered by class_type (their specs live in graph/specs.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeResult:
    #: the node's outputs, in the order its spec declares them
    outputs: tuple[Any, ...] = ()
    #: files an output node wrote
    files: list[str] = field(default_factory=list)


NodeFn = Callable[..., NodeResult]
IMPLEMENTATIONS: dict[str, NodeFn] = {}


def node(class_type: str) -> Callable[[NodeFn], NodeFn]:
    def register(fn: NodeFn) -> NodeFn:
        IMPLEMENTATIONS[class_type] = fn
        return fn

    return register


def implementations() -> dict[str, NodeFn]:
    """Every registered node (importing the modules that define them)."""
    from tui_diffusion.pipeline import (  # noqa: F401  (they register)
        nodes,
        nodes_cache,
        nodes_conditioning,
        nodes_controlnet,
        nodes_dit,
        nodes_flux,
        nodes_gligen,
        nodes_image,
        nodes_images,
        nodes_latent,
        nodes_latent_ops,
        nodes_lotus,
        nodes_masks,
        nodes_merge,
        nodes_sampling,
        nodes_uso,
        nodes_vision,
        upscale,
    )

    return IMPLEMENTATIONS

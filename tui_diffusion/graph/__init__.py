"""Torch-free workflow graph: node specs, workflow files and validation.

The TUI process imports this package; it must never import torch, diffusers or transformers.
"""

from tui_diffusion.graph.specs import NODE_SPECS, InputSpec, NodeSpec, OutputSpec, get_spec
from tui_diffusion.graph.validate import ValidationIssue, validate_workflow
from tui_diffusion.graph.workflow import Link, Workflow, WorkflowError

__all__ = [
    "NODE_SPECS",
    "InputSpec",
    "Link",
    "NodeSpec",
    "OutputSpec",
    "ValidationIssue",
    "Workflow",
    "WorkflowError",
    "get_spec",
    "validate_workflow",
]

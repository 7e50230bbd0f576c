"""ComfyUI's core node list covers the nodes of its comfy_extras modules, and the tool that derives it reads
plain name lists (``--names``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.graph.validate import comfy_core_nodes, validate_workflow
from tui_diffusion.graph.workflow import Workflow

ROOT = Path(__file__).resolve().parent.parent

# Nodes ComfyUI registers from comfy_extras/ (init_builtin_extra_nodes), not from nodes.py; the last ones are
# registered under a node_id that differs from their Python class name (PrimitiveInt is class Int, CombineHooks2 is
# class CombineHooks, TextEncodeAceStepAudio1.5 is class TextEncodeAceStepAudio15).
EXTRAS = ["StableCascade_EmptyLatentImage", "StableCascade_StageB_Conditioning", "OptimalStepsScheduler",
          "LotusConditioning", "WanVaceToVideo", "WanFirstLastFrameToVideo", "ModelSamplingStableCascade", "FreeU_V2",
          "PrimitiveInt", "CombineHooks2", "TextEncodeAceStepAudio1.5"]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("comfy_core_nodes_tool", ROOT / "tools" / "comfy_core_nodes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comfy_extras_nodes_are_core() -> None:
    core = comfy_core_nodes()
    assert [name for name in EXTRAS if name not in core] == []
    assert "FaceDetailerPro" not in core


def test_a_comfy_extras_node_is_reported_as_core_not_custom() -> None:
    kind = "StableCascade_EmptyLatentImage"
    assert kind not in NODE_SPECS  # not implemented here: validation must say what it is
    wf = Workflow.from_data({"1": {"class_type": kind, "inputs": {"width": 1024, "height": 1024}},
                             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    issues = "\n".join(str(i) for i in validate_workflow(wf))
    assert f"'{kind}' is a ComfyUI core node type this program does not implement yet" in issues
    assert "custom node" not in issues


def test_the_tool_reads_plain_name_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = tmp_path / "extras.txt"
    names.write_text("# read off comfy_extras\nStableCascade_EmptyLatentImage\n\n  LotusConditioning  # lotus\n",
                     encoding="utf-8")
    tool = _tool()
    assert tool.from_names(names) == {"StableCascade_EmptyLatentImage", "LotusConditioning"}
    out = tmp_path / "core.txt"
    monkeypatch.setattr(tool, "OUT", out)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.main(["--names", str(names)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert "#   names read off ComfyUI's comfy_extras modules: 2 names" in header
    assert not any(str(tmp_path) in line for line in header)  # where they came from, not this machine's paths
    listed = {line for line in lines if not line.startswith("#")}
    assert {"StableCascade_EmptyLatentImage", "LotusConditioning", "KSampler"} <= listed

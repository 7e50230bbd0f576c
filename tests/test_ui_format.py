"""ComfyUI's UI format: import to API format (Reroute, PrimitiveNode, notes, mute, bypass) and export back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tui_diffusion.graph import Workflow, WorkflowError, validate_workflow
from tui_diffusion.graph.ui_format import api_to_ui, ui_to_api

DATA = Path(__file__).parent / "data"


def test_comfyui_default_graph_imports_to_the_shipped_txt2img() -> None:
    ui = json.loads((DATA / "comfyui-default-graph.ui.json").read_text())
    api = Workflow.from_data(ui).to_data()
    expected = Workflow.load(ROOT / "workflows" / "txt2img.json").to_data()
    for node in expected.values():  # the catalogue's own notes (family, description) are not ComfyUI's
        node["_meta"] = {k: v for k, v in node.get("_meta", {}).items() if k == "title"}
    assert api == expected


def test_primitive_reroute_note_mute_and_bypass() -> None:
    api = ui_to_api(json.loads((DATA / "sdxl-primitive-reroute.ui.json").read_text()))
    assert set(api) == {"4", "6", "7", "5", "10", "12", "15", "16", "11", "17", "19"}  # no virtual/muted/bypassed
    base, refiner = api["10"]["inputs"], api["11"]["inputs"]
    assert base["model"] == ["4", 0]  # through the Reroute and the bypassed LoRA loader
    assert api["6"]["inputs"]["clip"] == ["4", 1] and api["7"]["inputs"]["clip"] == ["4", 1]
    assert base["noise_seed"] == 42 and refiner["noise_seed"] == 42  # the PrimitiveNode's value, pushed in
    assert base == {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
                    "add_noise": "enable", "noise_seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler",
                    "scheduler": "normal", "start_at_step": 0, "end_at_step": 20,
                    "return_with_leftover_noise": "enable"}
    assert api["10"]["_meta"]["control_after_generate"] == {"noise_seed": "randomize"}
    assert api["17"]["inputs"] == {"samples": ["11", 0], "vae": ["12", 2]}
    assert api["15"]["inputs"] == {"ascore": 6, "width": 1024, "height": 1024, "text": "a cabin in the woods",
                                   "clip": ["12", 1]}
    assert api["4"]["_meta"]["title"] == "Base model" and api["6"]["_meta"]["title"] == "Positive"


def test_unknown_nodes_are_imported_and_named_by_validation() -> None:
    ui = json.loads((DATA / "comfyui-default-graph.ui.json").read_text())
    ui["nodes"].append({"id": 30, "type": "FaceDetailerPro", "mode": 0, "inputs": [], "outputs": [],
                        "widgets_values": [0.5, "auto"]})
    wf = Workflow.from_data(ui)
    assert wf.nodes["30"]["_meta"]["widgets_values"] == [0.5, "auto"]
    assert any("node 30" in str(i) and "'FaceDetailerPro' is a custom node type" in str(i)
               for i in validate_workflow(wf))


def test_a_subgraph_instance_without_its_definition_is_refused_clearly(tmp_path: Path) -> None:
    ui = json.loads((DATA / "comfyui-default-graph.ui.json").read_text())
    ui["nodes"].append({"id": 30, "type": "0e1c6b62-7d3b-4a0c-9a41-7ad7a1d5f6f1", "mode": 0, "inputs": [],
                        "outputs": []})
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(ui))
    with pytest.raises(WorkflowError, match="sub.json: node 30 is an instance of subgraph .* whose definition"):
        Workflow.load(path)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_api_to_ui_to_api_is_identical(name: str) -> None:
    api = Workflow.load(ROOT / "workflows" / name).to_data()
    back = Workflow.from_data(json.loads(json.dumps(api_to_ui(api)))).to_data()
    assert back == api


def test_seed_modes_survive_the_round_trip() -> None:
    api = Workflow.load(ROOT / "workflows" / "txt2img.json").to_data()
    api["3"]["_meta"]["control_after_generate"] = {"seed": "increment"}
    ui = api_to_ui(api)
    sampler = next(n for n in ui["nodes"] if n["id"] == 3)
    assert sampler["widgets_values"][:2] == [156680208700286, "increment"]
    assert Workflow.from_data(ui).to_data() == api


def test_export_lays_nodes_out_in_columns_by_depth() -> None:
    ui = api_to_ui(Workflow.load(ROOT / "workflows" / "txt2img.json").to_data())
    x = {n["type"] + str(n["id"]): n["pos"][0] for n in ui["nodes"]}
    assert x["CheckpointLoaderSimple4"] < x["CLIPTextEncode6"] < x["KSampler3"] < x["VAEDecode8"] < x["SaveImage9"]
    assert {len(link) for link in ui["links"]} == {6} and ui["last_link_id"] == len(ui["links"]) == 9

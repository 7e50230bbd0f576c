"""Subgraphs and group nodes of ComfyUI's UI format expand into the flat API-format graph, and a workflow's missing
node types are named all at once, custom ones marked as such.

The subgraph files are ComfyUI's published templates, copied unchanged into ``tests/data/templates/`` (MIT, see the
README there); the expected graphs were read off the files by hand. None of the published templates uses the older
group nodes, so their test builds a workflow in that format (laid out as ComfyUI's frontend saves it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tui_diffusion.graph import Workflow, WorkflowError, validate_workflow
from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.graph.subgraphs import MAX_EXPANDED_NODES, MAX_NESTING
from tui_diffusion.graph.ui_format import ui_to_api
from tui_diffusion.graph.validate import comfy_core_nodes

TEMPLATES = Path(__file__).parent / "data" / "templates"
FLUX_DEV = "flux_dev_checkpoint_example"  # one subgraph: "Text to Image (Flux.1 Dev)", instance 56
USO = "flux1_dev_uso_reference_image_gen"  # nested: instance 112 holds instance 57; instance 113 bypassed
KLEIN = "image_flux2_klein_image_edit_4b_base"  # instance inputs saved in another order than the definition's
FLUX_DEV_SUBGRAPH = "e2a55522-bf16-4d9f-a222-5b8788ef2982"


def load(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))


def node(data: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in data["nodes"] if n["id"] == node_id)


def test_a_subgraph_flattens_to_its_inner_nodes_with_comfyuis_ids() -> None:
    api = ui_to_api(load(FLUX_DEV), FLUX_DEV)
    assert set(api) == {"9", *(f"56:{i}" for i in (47, 48, 49, 50, 51, 52, 53, 54))}  # the note is dropped
    assert api["9"]["inputs"] == {"filename_prefix": "Flux.1_Dev", "images": ["56:53", 0]}  # out through -20
    assert api["56:52"]["class_type"] == "KSampler"
    assert api["56:52"]["inputs"] == {"seed": 53943644181156, "steps": 20, "cfg": 1, "sampler_name": "euler",
                                      "scheduler": "simple", "denoise": 1, "model": ["56:48", 0],
                                      "positive": ["56:51", 0], "negative": ["56:54", 0],
                                      "latent_image": ["56:50", 0]}
    assert api["56:53"]["inputs"] == {"samples": ["56:52", 0], "vae": ["56:47", 0]}
    assert api["56:54"]["inputs"] == {"conditioning": ["56:51", 0]}
    assert api["56:51"]["inputs"]["clip"] == ["56:49", 0]
    # the subgraph inputs are unconnected and the instance saves no values: each inner widget keeps its own
    assert api["56:48"]["inputs"] == {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}
    assert api["56:49"]["inputs"] == {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                      "type": "flux", "device": "default"}
    assert api["56:50"]["inputs"] == {"width": 1024, "height": 1024, "batch_size": 1}
    assert api["56:47"]["inputs"] == {"vae_name": "ae.safetensors"}
    assert api["56:51"]["inputs"]["text"].startswith("Beautiful photography of a gorgeous-haired female artist")
    assert api["56:52"]["_meta"] == {"title": "KSampler", "control_after_generate": {"seed": "randomize"},
                                     "subgraph": "Text to Image (Flux.1 Dev)"}
    assert not validate_workflow(Workflow.from_data(api))


def test_promoted_widget_values_on_the_instance_reach_every_inner_node_they_feed() -> None:
    data = load(FLUX_DEV)
    # the definition's inputs: text, width, height, unet_name, clip_name1, clip_name2, vae_name, all widgets inside
    node(data, 56)["widgets_values"] = ["a red fox", 512, 768, "other-unet.safetensors", "a.safetensors",
                                        "b.safetensors", "other-vae.safetensors"]
    api = ui_to_api(data)
    assert api["56:51"]["inputs"]["text"] == "a red fox"
    assert (api["56:50"]["inputs"]["width"], api["56:50"]["inputs"]["height"]) == (512, 768)
    assert api["56:48"]["inputs"]["unet_name"] == "other-unet.safetensors"
    assert (api["56:49"]["inputs"]["clip_name1"], api["56:49"]["inputs"]["clip_name2"]) == ("a.safetensors",
                                                                                           "b.safetensors")
    assert api["56:47"]["inputs"]["vae_name"] == "other-vae.safetensors"
    assert api["56:49"]["inputs"]["type"] == "flux"  # not promoted: the inner value


def test_an_outer_link_into_a_subgraph_input_wins_over_its_widget() -> None:
    data = load(FLUX_DEV)
    data["nodes"].append({"id": 70, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                          "outputs": [{"name": "STRING", "type": "STRING", "links": [90]}],
                          "widgets_values": ["from outside"]})
    data["links"].append([90, 70, 0, 56, 0, "STRING"])
    node(data, 56)["inputs"][0]["link"] = 90
    node(data, 56)["widgets_values"] = ["ignored", 512, 768, "u", "a", "b", "v"]
    api = ui_to_api(data)
    assert api["56:51"]["inputs"]["text"] == "from outside"
    assert api["56:50"]["inputs"]["width"] == 512


def test_nested_subgraphs_and_their_promoted_widgets() -> None:
    data = load(USO)
    api = ui_to_api(data, USO)
    inner = sorted(k for k in api if k.startswith("112:57:"))
    assert inner == ["112:57:35", "112:57:41", "112:57:44"]
    assert not any(k.startswith("113:") for k in api)  # instance 113 is bypassed and its output unused
    assert api["9"]["inputs"]["images"] == ["112:8", 0]
    assert api["112:109"]["inputs"]["image"] == ["47", 0]  # the root LoadImage, in through input "image"
    assert api["112:31"]["inputs"]["positive"] == ["112:57:35", 0]  # out of the inner instance
    assert api["112:57:44"]["inputs"] == {"conditioning": ["112:6", 0], "latent": ["112:51", 0]}
    assert api["112:57:35"]["inputs"] == {"guidance": 3.5, "conditioning": ["112:57:41", 0]}
    assert api["112:57:35"]["_meta"]["subgraph"] == "USO Character Reference > USO Reference Conditioning"
    assert api["112:31"]["inputs"]["seed"] == 1058487910949722
    assert api["112:30"]["inputs"]["ckpt_name"] == "flux1-dev-fp8.safetensors"

    # the values come from the instances: 112's are its definition inputs' (text, width, height, seed, ckpt_name,
    # lora_name, name, clip_name; "image" is no widget), 57's is the inner instance's guidance
    node(data, 112)["widgets_values"] = ["a lighthouse", 640, 480, 7, "c.safetensors", "l.safetensors",
                                         "p.safetensors", "v.safetensors"]
    sub = next(s for s in data["definitions"]["subgraphs"] if s["name"] == "USO Character Reference")
    next(n for n in sub["nodes"] if n["id"] == 57)["widgets_values"] = [2.5]
    api = ui_to_api(data)
    assert api["112:6"]["inputs"]["text"] == "a lighthouse"
    assert api["112:110"]["inputs"] == {"width": 640, "height": 480, "batch_size": 1}
    assert api["112:31"]["inputs"]["seed"] == 7
    assert api["112:30"]["inputs"]["ckpt_name"] == "c.safetensors"
    assert api["112:43"]["inputs"]["lora_name"] == "l.safetensors"
    assert api["112:39"]["inputs"]["name"] == "p.safetensors"
    assert api["112:40"]["inputs"]["clip_name"] == "v.safetensors"
    assert api["112:57:35"]["inputs"]["guidance"] == 2.5


def test_instance_inputs_are_matched_to_the_definition_by_name() -> None:
    data = load(KLEIN)
    # instance 75 saves [text, image]; its definition's order is unet_name, clip_name, vae_name, text, image, ...
    assert [i["name"] for i in node(data, 75)["inputs"]] == ["text", "image"]
    api = ui_to_api(data, KLEIN)
    assert api["75:80"]["inputs"]["image"] == ["76", 0]
    assert api["9"]["inputs"]["images"] == ["75:65", 0]
    assert api["75:70"]["inputs"]["unet_name"] == "flux-2-klein-base-4b-fp8.safetensors"
    assert api["75:73"]["inputs"]["noise_seed"] == 1111443136920027
    assert not any(k.startswith("92:") for k in api)  # a bypassed instance runs nothing inside
    node(data, 75)["widgets_values"] = ["u.safetensors", "c.safetensors", "v.safetensors", "make it blue", 5]
    api = ui_to_api(data)
    assert (api["75:70"]["inputs"]["unet_name"], api["75:71"]["inputs"]["clip_name"],
            api["75:72"]["inputs"]["vae_name"]) == ("u.safetensors", "c.safetensors", "v.safetensors")
    assert api["75:74"]["inputs"]["text"] == "make it blue" and api["75:73"]["inputs"]["noise_seed"] == 5


def test_a_bypassed_instance_passes_its_input_through_and_a_muted_one_gives_nothing() -> None:
    data = load(KLEIN)
    node(data, 75)["mode"] = 4
    api = ui_to_api(data)
    assert api["9"]["inputs"]["images"] == ["76", 0] and not any(":" in k for k in api)
    node(data, 75)["mode"] = 2
    wf = Workflow.from_data(data)
    assert "images" not in wf.inputs("9")
    assert any(i.node_id == "9" and i.input == "images" and "missing" in i.message for i in validate_workflow(wf))


def test_a_subgraph_used_twice_gets_unique_ids_and_its_own_values() -> None:
    data = load(FLUX_DEV)
    second = copy.deepcopy(node(data, 56))
    second.update(id=60, widgets_values=["a second prompt"], title="Second")
    second["outputs"][0]["links"] = [91]
    data["nodes"] += [second, {"id": 61, "type": "SaveImage", "mode": 0,
                               "inputs": [{"name": "images", "type": "IMAGE", "link": 91}], "outputs": [],
                               "widgets_values": ["second"]}]
    data["links"].append([91, 60, 0, 61, 0, "IMAGE"])
    api = ui_to_api(data)
    assert len(api) == 2 + 2 * 8
    assert api["9"]["inputs"]["images"] == ["56:53", 0] and api["61"]["inputs"]["images"] == ["60:53", 0]
    assert api["60:52"]["inputs"]["model"] == ["60:48", 0] and api["56:52"]["inputs"]["model"] == ["56:48", 0]
    assert api["60:51"]["inputs"]["text"] == "a second prompt"  # the only saved value: the first promoted input
    assert api["56:51"]["inputs"]["text"].startswith("Beautiful photography")
    assert api["60:51"]["_meta"]["subgraph"] == "Second"


def test_subgraphs_that_contain_themselves_are_refused_naming_them(tmp_path: Path) -> None:
    data = load(FLUX_DEV)
    sub = data["definitions"]["subgraphs"][0]
    other = copy.deepcopy(sub)
    other.update(id="0e1c6b62-7d3b-4a0c-9a41-7ad7a1d5f6f1", name="Other")
    other["nodes"].append({"id": 99, "type": sub["id"], "mode": 0, "inputs": [], "outputs": []})
    sub["nodes"].append({"id": 99, "type": other["id"], "mode": 0, "inputs": [], "outputs": []})
    data["definitions"]["subgraphs"].append(other)
    path = tmp_path / "loop.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WorkflowError, match=r"loop\.json: subgraph ('Text to Image \(Flux\.1 Dev\)' -> 'Other' -> "
                                            r"'Text to Image \(Flux\.1 Dev\)'|'Other' -> 'Text to Image \(Flux\.1 "
                                            r"Dev\)' -> 'Other'): a subgraph cannot contain itself"):
        Workflow.load(path)


def _definition(index: int, inner: list[int]) -> dict[str, Any]:
    """A subgraph definition holding instances of the definitions numbered ``inner``."""
    return {"id": f"00000000-0000-4000-8000-{index:012d}", "name": f"level {index}", "inputs": [], "outputs": [],
            "links": [], "nodes": [{"id": k + 1, "type": f"00000000-0000-4000-8000-{n:012d}", "mode": 0}
                                   for k, n in enumerate(inner)]}


def test_nesting_and_expansion_are_bounded() -> None:
    deep = [_definition(i, [i + 1]) for i in range(MAX_NESTING + 5)] + [_definition(MAX_NESTING + 5, [])]
    data = {"nodes": [{"id": 1, "type": deep[0]["id"], "mode": 0}], "links": [],
            "definitions": {"subgraphs": deep}}
    with pytest.raises(WorkflowError, match=f"nested more than {MAX_NESTING} levels"):
        Workflow.from_data(data, "deep.json")
    wide = [_definition(i, [i + 1, i + 1]) for i in range(20)] + [_definition(20, [])]  # 2**20 leaves
    data = {"nodes": [{"id": 1, "type": wide[0]["id"], "mode": 0}], "links": [],
            "definitions": {"subgraphs": wide}}
    with pytest.raises(WorkflowError, match=f"wide.json: its subgraphs expand to more than {MAX_EXPANDED_NODES}"):
        Workflow.from_data(data, "wide.json")


#: a group node as ComfyUI's frontend saved them: Flux's custom sampling nodes under "workflow/FLUX"
GROUP = {
    "nodes": [
        {"type": "RandomNoise", "mode": 0, "outputs": [{"name": "NOISE", "type": "NOISE", "links": []}],
         "widgets_values": [1, "randomize"], "index": 0},
        {"type": "KSamplerSelect", "mode": 0, "outputs": [{"name": "SAMPLER", "type": "SAMPLER", "links": []}],
         "widgets_values": ["euler"], "index": 1},
        {"type": "BasicScheduler", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": None}],
         "outputs": [{"name": "SIGMAS", "type": "SIGMAS", "links": []}], "widgets_values": ["simple", 20, 1],
         "index": 2},
        {"type": "SamplerCustomAdvanced", "mode": 0,
         "inputs": [{"name": n, "type": t, "link": None} for n, t in
                    (("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                     ("latent_image", "LATENT"))],
         "outputs": [{"name": "output", "type": "LATENT", "links": []},
                     {"name": "denoised_output", "type": "LATENT", "links": None}], "index": 3},
    ],
    "links": [[None, 0, 2, 0, 12, "MODEL"], [0, 0, 3, 0, 16, "NOISE"], [None, 0, 3, 1, 25, "GUIDER"],
              [1, 0, 3, 2, 17, "SAMPLER"], [2, 0, 3, 3, 22, "SIGMAS"], [None, 0, 3, 4, 5, "LATENT"]],
    "external": [[3, 0, "LATENT"]],
}


def group_workflow(kind: str = "workflow/FLUX") -> dict[str, Any]:
    """The txt2img graph with its sampler replaced by the group node (instance 28)."""
    def n(node_id: int, kind: str, inputs: list[tuple[str, str, int]], values: list[Any]) -> dict[str, Any]:
        return {"id": node_id, "type": kind, "mode": 0, "widgets_values": values,
                "inputs": [{"name": a, "type": b, "link": c} for a, b, c in inputs], "outputs": []}

    return {"nodes": [
        n(5, "EmptyLatentImage", [], [1024, 1024, 1]), n(11, "DualCLIPLoader", [], ["t5.safetensors", "l.safetensors",
                                                                                    "flux"]),
        n(12, "UNETLoader", [], ["flux1-dev.safetensors", "default"]), n(10, "VAELoader", [], ["ae.safetensors"]),
        n(6, "CLIPTextEncode", [("clip", "CLIP", 10)], ["a wizard"]),
        n(25, "BasicGuider", [("model", "MODEL", 63), ("conditioning", "CONDITIONING", 64)], []),
        n(28, kind, [("model", "MODEL", 69), ("guider", "GUIDER", 70), ("latent_image", "LATENT", 71)],
          [145663190803925, "increment", "dpmpp_2m", "beta", 12, 0.75]),
        n(8, "VAEDecode", [("samples", "LATENT", 68), ("vae", "VAE", 12)], []),
        n(26, "PreviewImage", [("images", "IMAGE", 41)], []),
    ], "links": [[10, 11, 0, 6, 0, "CLIP"], [12, 10, 0, 8, 1, "VAE"], [41, 8, 0, 26, 0, "IMAGE"],
                 [63, 12, 0, 25, 0, "MODEL"], [64, 6, 0, 25, 1, "CONDITIONING"], [68, 28, 0, 8, 0, "LATENT"],
                 [69, 12, 0, 28, 0, "MODEL"], [70, 25, 0, 28, 1, "GUIDER"], [71, 5, 0, 28, 2, "LATENT"]],
        "extra": {"groupNodes": {"FLUX": copy.deepcopy(GROUP)}}, "version": 0.4}


@pytest.mark.parametrize("kind", ["workflow/FLUX", "workflow>FLUX"])
def test_group_nodes_expand_with_the_instances_inputs_outputs_and_widgets(kind: str) -> None:
    api = ui_to_api(group_workflow(kind))
    assert {k for k in api if ":" in k} == {"28:0", "28:1", "28:2", "28:3"}
    assert api["8"]["inputs"]["samples"] == ["28:3", 0]  # the group's output 0: the sampler's first output
    assert api["28:3"]["inputs"] == {"noise": ["28:0", 0], "guider": ["25", 0], "sampler": ["28:1", 0],
                                     "sigmas": ["28:2", 0], "latent_image": ["5", 0]}
    assert api["28:2"]["inputs"] == {"scheduler": "beta", "steps": 12, "denoise": 0.75, "model": ["12", 0]}
    assert api["28:0"]["inputs"] == {"noise_seed": 145663190803925}  # the instance's values, not the saved 1
    assert api["28:1"]["inputs"] == {"sampler_name": "dpmpp_2m"}
    assert not validate_workflow(Workflow.from_data(api))


def test_a_group_node_without_its_definition_is_refused_clearly() -> None:
    data = group_workflow()
    data["extra"]["groupNodes"] = {}
    with pytest.raises(WorkflowError, match="g.json: node 28 is the group node 'FLUX', whose definition"):
        Workflow.from_data(data, "g.json")


def test_missing_node_types_are_named_at_once_and_custom_ones_marked() -> None:
    data = load(FLUX_DEV)
    sub = data["definitions"]["subgraphs"][0]
    next(n for n in sub["nodes"] if n["id"] == 54)["type"] = "FaceDetailerPro"  # a custom node
    next(n for n in sub["nodes"] if n["id"] == 47)["type"] = "FaceDetailerPro"
    node(data, 9)["type"] = "WanImageToVideo"  # in ComfyUI's core, not in this program
    issues = [str(i) for i in validate_workflow(Workflow.from_data(data, FLUX_DEV))]
    assert issues[0] == ("the workflow needs 2 node types this program lacks: custom nodes (not in ComfyUI's "
                         "core; this program has no custom nodes): 'FaceDetailerPro' (nodes 56:47, 56:54); ComfyUI "
                         "core nodes this program does not implement yet: 'WanImageToVideo' (node 9)")
    assert "node 56:54 'FaceDetailerPro': 'FaceDetailerPro' is a custom node type (not in ComfyUI's core)" in \
        "\n".join(issues)
    assert "node 9 'WanImageToVideo': 'WanImageToVideo' is a ComfyUI core node type this " \
           "program does not implement yet" in "\n".join(issues)
    assert not any("unknown" in i for i in issues)


def test_the_core_node_list_holds_comfyuis_nodes_and_all_of_ours() -> None:
    core = comfy_core_nodes()
    assert {name for name, spec in NODE_SPECS.items() if not spec.extension} <= core
    assert "ApplyStepCache" not in core and NODE_SPECS["ApplyStepCache"].extension  # ours, not ComfyUI's
    assert {"KSampler", "ImageScaleToMaxDimension", "LotusConditioning", "Flux2Scheduler"} <= core
    assert "FaceDetailerPro" not in core and not any(_is_uuid(n) for n in core)


def _is_uuid(name: str) -> bool:
    return len(name) == 36 and name.count("-") == 4


def test_every_published_template_copied_here_expands_without_error() -> None:
    for name in (FLUX_DEV, USO, KLEIN):
        api = ui_to_api(load(name), name)
        links = [v for n in api.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2]
        assert all(str(src) in api for src, _ in links), name  # no link left pointing at an instance
        assert not any(n["class_type"] in (FLUX_DEV_SUBGRAPH, "PrimitiveNode", "Reroute") for n in api.values())


def test_a_subgraph_template_runs_on_tiny_files(tmp_path: Path) -> None:
    """ComfyUI's Flux.1 dev template with a subgraph imports, validates and runs on a tiny Flux dev transformer,
    VAE and text encoders under the file names it expects; its size comes in through the promoted widgets."""
    import numpy as np
    from PIL import Image

    from tests.dit_helpers import CPU
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline import checkpoint_writer_dit as w
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    models = tmp_path / "models"
    w.write_flux_transformer(models / "diffusion_models" / "flux1-dev.safetensors", w.TinyFlux(heads=1))
    w.write_vae16(models / "vae" / "ae.safetensors", flux=True)
    w.write_text_encoders(models / "text_encoders")
    data = load(FLUX_DEV)
    node(data, 56)["widgets_values"] = ["a small red house", 64, 48, "flux1-dev.safetensors", "clip_l.safetensors",
                                        "t5xxl_fp16.safetensors", "ae.safetensors"]
    wf = Workflow.from_data(data, FLUX_DEV)
    wf.set_input("56:52", "steps", 1)
    paths = ModelPaths(models, input_dir=tmp_path / "input")
    assert not validate_workflow(wf, paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(wf.to_data(), Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1
    image = np.asarray(Image.open(saved[0]))
    assert image.shape[:2] == (48, 64) and image.std() > 0

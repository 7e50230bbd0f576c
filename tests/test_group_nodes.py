"""ComfyUI's older group nodes (``extra.groupNodes``, instances typed ``workflow/NAME`` or ``workflow>NAME``) expand
as ComfyUI's frontend expands them (its ``groupNode.ts``): the instance's inputs are the inner inputs not linked
inside (links with a null origin come from the instance), its outputs those not used only inside, its widget values
the inner widgets node by node, and the instance's values (seed controls included) win over those saved with the
definition.

The files in ``tests/data/groupnodes/`` reproduce real files saved by ComfyUI (see the README there for which
ones, and why they are not copied): the same definitions, links, ``external`` and ``config`` entries and instance
widget orders, with their own values, prompts and model file names.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tui_diffusion.graph import Workflow, validate_workflow
from tui_diffusion.graph.ui_format import ui_to_api

DATA = Path(__file__).parent / "data" / "groupnodes"
FLUX = "flux_sampler_group"  # mirrors FLUX.1 SCHNELL 1.0 / FLUX.1 DEV 1.0: instance 28 of "FLUX"
INPAINT = "inpaint_hint_group"  # mirrors Stable Cascade Inpainting ControlNet: instance 68, a Reroute inside
VIDEO = "video_sampler_group"  # mirrors HUNYUAN VIDEO 1.0: instance 90 of "HUNYUAN", "workflow>" spelling
TXT2IMG = "txt2img_group"  # mirrors ComfyUI_frontend's group_ksampler_external_latent: a whole txt2img in a group


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def node(data: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(n for n in data["nodes"] if n["id"] == node_id)


def test_the_flux_sampler_group_expands_with_the_instances_widget_values() -> None:
    """Widget order on the instance: noise_seed, its control, sampler_name, scheduler, steps, denoise; the inner
    nodes' own saved values (seed 7, "euler", 20 steps) are not used."""
    api = ui_to_api(load(FLUX), FLUX)
    assert {k for k in api if ":" in k} == {"28:0", "28:1", "28:2", "28:3"}  # the used definition "FLUX" only
    assert api["28:0"]["inputs"] == {"noise_seed": 424242}
    assert api["28:1"]["inputs"] == {"sampler_name": "dpmpp_2m"}
    assert api["28:2"]["inputs"] == {"scheduler": "beta", "steps": 2, "denoise": 1, "model": ["12", 0]}
    assert api["28:3"]["inputs"] == {"noise": ["28:0", 0], "guider": ["25", 0], "sampler": ["28:1", 0],
                                     "sigmas": ["28:2", 0], "latent_image": ["5", 0]}
    assert api["8"]["inputs"]["samples"] == ["28:3", 0]
    assert not validate_workflow(Workflow.from_data(api))


def test_the_instances_seed_control_wins_over_the_one_saved_inside() -> None:
    """The instance says "fixed", the RandomNoise saved inside the definition "randomize": ComfyUI runs the
    instance's control widget, so the seed stays as it is."""
    api = ui_to_api(load(FLUX), FLUX)
    assert "control_after_generate" not in api["28:0"]["_meta"]
    data = load(FLUX)
    node(data, 28)["widgets_values"][1] = "increment"
    assert ui_to_api(data, FLUX)["28:0"]["_meta"]["control_after_generate"] == {"noise_seed": "increment"}


def test_a_bypassed_group_instance_passes_its_input_of_the_output_type_through() -> None:
    """Bypassed (mode 4), the instance runs nothing and its LATENT output is its LATENT input, as for any
    bypassed node in ComfyUI; muted (mode 2), it gives nothing."""
    data = load(FLUX)
    node(data, 28)["mode"] = 4
    api = ui_to_api(data, FLUX)
    assert not any(":" in k for k in api)
    assert api["8"]["inputs"]["samples"] == ["5", 0]
    node(data, 28)["mode"] = 2
    assert "samples" not in ui_to_api(data, FLUX)["8"]["inputs"]


def test_an_instance_of_the_definition_whose_external_holds_a_whole_node() -> None:
    """The file's second definition ("flux") writes a node object where ComfyUI's builder writes an index in
    ``external``; ComfyUI's frontend then never matches it, so it changes nothing. Its inputs: BasicGuider's
    model and conditioning, BasicScheduler's model, the sampler's latent_image; outputs: the sampler's two."""
    data = load(FLUX)
    instance = node(data, 28)
    instance["type"] = "workflow/flux"
    instance["inputs"] = [{"name": "model", "type": "MODEL", "link": 69},
                          {"name": "conditioning", "type": "CONDITIONING", "link": 64},
                          {"name": "model", "type": "MODEL", "link": 72},
                          {"name": "latent_image", "type": "LATENT", "link": 71}]
    data["links"] = [link for link in data["links"] if link[0] not in (63, 70)]
    data["links"] += [[72, 12, 0, 28, 2, "MODEL"], [73, 28, 1, 26, 0, "IMAGE"]]
    data["nodes"] = [n for n in data["nodes"] if n["id"] != 25]
    node(data, 26)["inputs"][0]["link"] = 73
    api = ui_to_api(data, FLUX)
    assert api["28:0"]["class_type"] == "BasicGuider"
    assert api["28:0"]["inputs"] == {"model": ["12", 0], "conditioning": ["6", 0]}
    assert api["28:3"]["inputs"]["model"] == ["12", 0]
    assert api["28:4"]["inputs"]["guider"] == ["28:0", 0]
    assert api["28:4"]["inputs"]["latent_image"] == ["5", 0]
    assert api["8"]["inputs"]["samples"] == ["28:4", 0]
    assert api["26"]["inputs"]["images"] == ["28:4", 1]  # output 1: denoised_output
    assert api["28:1"]["inputs"] == {"noise_seed": 424242}  # same widget order as "FLUX"


def test_a_group_with_a_reroute_and_a_node_this_program_lacks_still_takes_the_instances_values() -> None:
    """The inpainting hint group: a Reroute carries the instance's mask input (a link with a null origin, slot 1)
    to two nodes; JoinImageWithAlpha has no widgets here; config hides widgets (their values stay in the
    instance's list) and renames inputs. Widget order: EmptyImage's four, ThresholdMask's value, then
    ImageCompositeMasked's x, y, resize_source."""
    api = ui_to_api(load(INPAINT), INPAINT)
    assert api["68:0"]["inputs"] == {"width": 640, "height": 384, "batch_size": 1, "color": 255}
    assert api["68:1"]["inputs"] == {"value": 0.25, "mask": ["50", 1]}  # through the Reroute
    assert api["68:2"]["inputs"] == {"mask": ["50", 1]}
    assert api["68:3"]["inputs"] == {"x": 8, "y": 16, "resize_source": False, "destination": ["50", 0],
                                     "source": ["68:0", 0], "mask": ["68:1", 0]}
    assert api["68:5"]["inputs"] == {"image": ["68:3", 0], "alpha": ["68:2", 0]}
    assert api["76"]["inputs"] == {"images": ["68:5", 0]}
    assert "68:4" not in api  # the Reroute
    issues = [str(i) for i in validate_workflow(Workflow.from_data(api, INPAINT))]
    assert any("'JoinImageWithAlpha' (node 68:5)" in i for i in issues)


def test_a_reroute_input_hidden_by_config_is_keyed_by_its_type() -> None:
    """ComfyUI names a Reroute's input after its type ("MASK"), so ``config`` hides it under that name: the
    instance then has no input for it, and the next outside input (here JoinImageWithAlpha's alpha, given a
    null-origin link) is the instance's second."""
    data = load(INPAINT)
    group = data["extra"]["groupNodes"]["StableCascadeInpaintCnet"]
    group["config"]["4"]["input"]["MASK"] = {"visible": False}
    group["links"][-1] = [None, 1, 5, 1, 50, "MASK"]
    api = ui_to_api(data, INPAINT)
    assert api["68:5"]["inputs"]["alpha"] == ["50", 1]
    assert "mask" not in api["68:1"]["inputs"] and "mask" not in api["68:2"]["inputs"]


def test_config_can_hide_an_output_or_show_one_used_inside() -> None:
    """``config`` output entries: hiding the sampler's first output makes denoised_output the instance's output
    0; showing RandomNoise's NOISE (used inside) puts it first."""
    data = load(FLUX)
    data["extra"]["groupNodes"]["FLUX"]["config"] = {"3": {"output": {"0": {"visible": False}}}}
    assert ui_to_api(data, FLUX)["8"]["inputs"]["samples"] == ["28:3", 1]
    data["extra"]["groupNodes"]["FLUX"]["config"] = {"0": {"output": {"0": {"visible": True}}}}
    node(data, 8)["inputs"][0]["link"] = 68
    data["links"].append([90, 28, 1, 26, 0, "LATENT"])  # instance output 1 is now the sampler's output
    node(data, 26)["inputs"][0]["link"] = 90
    api = ui_to_api(data, FLUX)
    assert api["8"]["inputs"]["samples"] == ["28:0", 0] and api["26"]["inputs"]["images"] == ["28:3", 0]


def test_the_video_sampler_group_of_a_newer_frontend() -> None:
    """``workflow>`` spelling, inner nodes saved with id -1, three definitions of which one is used; two inner
    inputs named "model", the second shown as "ModelSamplingSD3 model"; nine widget values over six nodes."""
    data = load(VIDEO)
    api = ui_to_api(data, VIDEO)
    inner = {k: v for k, v in api.items() if k.startswith("90:")}
    assert [inner[f"90:{i}"]["class_type"] for i in range(8)] == [
        "KSamplerSelect", "RandomNoise", "BasicScheduler", "ModelSamplingSD3", "CLIPTextEncode", "FluxGuidance",
        "BasicGuider", "SamplerCustomAdvanced"]
    assert api["90:0"]["inputs"] == {"sampler_name": "dpmpp_2m"}
    assert api["90:1"]["inputs"] == {"noise_seed": 99}
    assert api["90:1"]["_meta"]["control_after_generate"] == {"noise_seed": "increment"}
    assert api["90:2"]["inputs"] == {"scheduler": "beta", "steps": 12, "denoise": 0.8, "model": ["12", 0]}
    assert api["90:3"]["inputs"] == {"shift": 5, "model": ["12", 0]}
    assert api["90:4"]["inputs"] == {"text": "a paper boat drifting down a rainy street", "clip": ["11", 0]}
    assert api["90:5"]["inputs"] == {"guidance": 4.5, "conditioning": ["90:4", 0]}
    assert api["90:6"]["inputs"] == {"model": ["90:3", 0], "conditioning": ["90:5", 0]}
    assert api["90:7"]["inputs"]["latent_image"] == ["82", 0]
    assert api["73"]["inputs"]["samples"] == ["90:7", 0]
    issues = [str(i) for i in validate_workflow(Workflow.from_data(api, VIDEO))]
    assert "custom nodes (not in ComfyUI's core; this program has no custom nodes): 'VHS_VideoCombine'" in issues[0]
    assert "'EmptyHunyuanLatentVideo' (node 82)" in issues[0]


def _primitive_group() -> dict[str, Any]:
    """A group (as ComfyUI's builder stores one) of a PrimitiveNode feeding KSamplerSelect's converted
    sampler_name, a Note, an unlinked PrimitiveNode and BasicScheduler; the instance shows the linked primitive's
    widgets (value, control, filter) then BasicScheduler's."""
    group = {
        "nodes": [
            {"type": "PrimitiveNode", "mode": 0, "outputs": [{"name": "COMBO", "type": "COMBO", "links": [],
                                                              "widget": {"name": "sampler_name"}}],
             "widgets_values": ["euler", "fixed", ""], "index": 0},
            {"type": "Note", "mode": 0, "widgets_values": ["how this group samples"], "index": 1},
            {"type": "KSamplerSelect", "mode": 0,
             "inputs": [{"name": "sampler_name", "type": "COMBO", "link": None, "widget": {"name": "sampler_name"}}],
             "outputs": [{"name": "SAMPLER", "type": "SAMPLER", "links": []}], "widgets_values": ["euler"],
             "index": 2},
            {"type": "PrimitiveNode", "mode": 0, "outputs": [{"name": "connect to widget input", "type": "*",
                                                              "links": []}], "index": 3},
            {"type": "BasicScheduler", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": None}],
             "outputs": [{"name": "SIGMAS", "type": "SIGMAS", "links": []}], "widgets_values": ["simple", 20, 1],
             "index": 4},
        ],
        "links": [[0, 0, 2, 0, 9, "COMBO"], [None, 0, 4, 0, 4, "MODEL"]],
        "external": [],
    }
    return {"nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["model.safetensors"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
        {"id": 7, "type": "workflow>Sampling", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "outputs": [{"name": "SAMPLER", "type": "SAMPLER", "links": [2]},
                     {"name": "SIGMAS", "type": "SIGMAS", "links": [3]}],
         "widgets_values": ["dpmpp_2m", "fixed", "", "karras", 9, 0.5]},
        {"id": 9, "type": "SamplerCustom", "mode": 0, "inputs": [
            {"name": "sampler", "type": "SAMPLER", "link": 2}, {"name": "sigmas", "type": "SIGMAS", "link": 3}],
         "widgets_values": [True, 1, "fixed", 8.0]},
    ], "links": [[1, 4, 0, 7, 0, "MODEL"], [2, 7, 0, 9, 2, "SAMPLER"], [3, 7, 1, 9, 3, "SIGMAS"]],
        "extra": {"groupNodes": {"Sampling": group}}, "version": 0.4}


def test_primitive_and_note_nodes_inside_a_group() -> None:
    """A linked PrimitiveNode's widgets are the instance's first values; a Note and an unlinked PrimitiveNode add
    no widget and no output (so BasicScheduler's SIGMAS is the instance's output 1)."""
    api = ui_to_api(_primitive_group(), "g.json")
    assert api["7:2"]["inputs"] == {"sampler_name": "dpmpp_2m"}
    assert api["7:4"]["inputs"] == {"scheduler": "karras", "steps": 9, "denoise": 0.5, "model": ["4", 0]}
    assert api["9"]["inputs"]["sampler"] == ["7:2", 0] and api["9"]["inputs"]["sigmas"] == ["7:4", 0]


def test_a_reroute_feeding_widgets_inside_a_group_is_a_widget_of_the_instance() -> None:
    """ComfyUI's frontend makes a Reroute whose first target is a (converted) widget a widget of the group node,
    not an input (its type names a widget kind): one seed shared by two RandomNoise nodes is the instance's first
    value, with the seed's control entry after it; BasicScheduler's model stays the instance's only input."""
    random_noise = {"type": "RandomNoise", "mode": 0, "widgets_values": [5, "randomize"],
                    "inputs": [{"name": "noise_seed", "type": "INT", "link": None, "widget": {"name": "noise_seed"}}],
                    "outputs": [{"name": "NOISE", "type": "NOISE", "links": []}]}
    group = {"nodes": [
        {"type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": None}],
         "outputs": [{"name": "", "type": "INT", "links": []}], "index": 0},
        {**copy.deepcopy(random_noise), "index": 1},
        {**copy.deepcopy(random_noise), "index": 2},
        {"type": "BasicScheduler", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": None}],
         "outputs": [{"name": "SIGMAS", "type": "SIGMAS", "links": []}], "widgets_values": ["simple", 20, 1],
         "index": 3},
    ], "links": [[0, 0, 1, 0, 3, "INT"], [0, 0, 2, 0, 3, "INT"], [None, 0, 3, 0, 4, "MODEL"]], "external": []}
    data = _primitive_group()
    data["extra"]["groupNodes"]["Sampling"] = group
    instance = node(data, 7)
    instance["widgets_values"] = [1234, "fixed", "karras", 9, 0.5]
    instance["outputs"] = [{"name": "NOISE", "type": "NOISE", "links": []},
                           {"name": "RandomNoise NOISE", "type": "NOISE", "links": []},
                           {"name": "SIGMAS", "type": "SIGMAS", "links": [3]}]
    data["links"] = [[1, 4, 0, 7, 0, "MODEL"], [3, 7, 2, 9, 3, "SIGMAS"]]
    api = ui_to_api(data, "g.json")
    assert api["7:1"]["inputs"] == {"noise_seed": 1234} and api["7:2"]["inputs"] == {"noise_seed": 1234}
    assert "control_after_generate" not in api["7:1"]["_meta"]
    assert api["7:3"]["inputs"] == {"scheduler": "karras", "steps": 9, "denoise": 0.5, "model": ["4", 0]}
    assert api["9"]["inputs"]["sigmas"] == ["7:3", 0]


def test_widgets_converted_to_inputs_inside_a_group_come_last_in_the_order_they_were_converted() -> None:
    """A KSampler in a group with steps then seed converted to inputs (slots 4 and 5), unlinked inside: they
    are the instance's last inputs and last widget values (steps, then seed and its control), after cfg,
    sampler_name, scheduler and denoise; a PrimitiveNode feeding the instance's seed input wins."""
    ks_inputs = [{"name": n, "type": t, "link": None} for n, t in (
        ("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"))]
    ks_inputs += [{"name": n, "type": "INT", "link": None, "widget": {"name": n}} for n in ("steps", "seed")]
    group = {"nodes": [{"type": "KSampler", "mode": 0, "inputs": ks_inputs,
                        "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
                        "widgets_values": [1, "randomize", 20, 8, "euler", "normal", 1], "index": 0}],
             "links": [], "external": []}
    instance_inputs = [dict(i) for i in ks_inputs]
    instance_inputs[5]["link"] = 1
    data = {"nodes": [
        {"id": 3, "type": "workflow>Sampler", "mode": 0, "inputs": instance_inputs,
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
         "widgets_values": [6.5, "dpmpp_2m", "karras", 0.9, 3, 111, "fixed"]},
        {"id": 5, "type": "PrimitiveNode", "mode": 0, "widgets_values": [777, "fixed"],
         "outputs": [{"name": "INT", "type": "INT", "links": [1], "widget": {"name": "seed"}}]},
    ], "links": [[1, 5, 0, 3, 5, "INT"]], "extra": {"groupNodes": {"Sampler": group}}, "version": 0.4}
    api = ui_to_api(data, "g.json")
    assert api["3:0"]["inputs"] == {"seed": 777, "steps": 3, "cfg": 6.5, "sampler_name": "dpmpp_2m",
                                    "scheduler": "karras", "denoise": 0.9}


def test_instance_widgets_converted_to_inputs_take_the_primitive_nodes_values() -> None:
    """On the instance, the negative prompt's widget (named "CLIPTextEncode text": the second "text" of the group,
    prefixed with its node's type as ComfyUI's frontend names it) and the seed are converted to inputs fed by
    PrimitiveNodes: their values reach the inner nodes (the instance's own saved values are older)."""
    data = load(TXT2IMG)
    instance = node(data, 10)
    instance["inputs"] += [
        {"name": "CLIPTextEncode text", "type": "STRING", "link": 101, "widget": {"name": "CLIPTextEncode text"}},
        {"name": "seed", "type": "INT", "link": 102, "widget": {"name": "seed"}}]
    data["nodes"] += [
        {"id": 21, "type": "PrimitiveNode", "mode": 0, "widgets_values": ["lowres, watermark"],
         "outputs": [{"name": "STRING", "type": "STRING", "links": [101], "widget": {"name": "CLIPTextEncode text"}}]},
        {"id": 22, "type": "PrimitiveNode", "mode": 0, "widgets_values": [8080, "increment"],
         "outputs": [{"name": "INT", "type": "INT", "links": [102], "widget": {"name": "seed"}}]}]
    data["links"] += [[101, 21, 0, 10, 1, "STRING"], [102, 22, 0, 10, 2, "INT"]]
    api = ui_to_api(data, TXT2IMG)
    assert api["10:1"]["inputs"]["text"] == "a red bicycle leaning on a wall"
    assert api["10:2"]["inputs"]["text"] == "lowres, watermark"
    assert api["10:3"]["inputs"]["seed"] == 8080 and api["10:3"]["inputs"]["steps"] == 2
    assert api["10:3"]["_meta"]["control_after_generate"] == {"seed": "increment"}


def test_values_that_do_not_fit_the_definition_leave_the_saved_ones() -> None:
    """An instance whose value count does not match its definition's widgets (a definition changed since) keeps
    the values saved inside, as before, rather than shifting them onto the wrong widgets."""
    data = load(FLUX)
    node(data, 28)["widgets_values"] = [424242, "fixed", "dpmpp_2m"]
    api = ui_to_api(data, FLUX)
    assert api["28:0"]["inputs"] == {"noise_seed": 7}
    assert api["28:2"]["inputs"]["steps"] == 20


def test_hidden_inputs_of_the_second_of_two_identical_nodes() -> None:
    """ComfyUI_frontend's own test file shape: two VAEDecode nodes, ``config`` hiding the second one's inputs, so
    the instance's two inputs are the first one's and the second is left unconnected (validation then says so)."""
    decode = {"type": "VAEDecode", "mode": 0, "inputs": [{"name": "samples", "type": "LATENT", "link": None},
                                                         {"name": "vae", "type": "VAE", "link": None}],
              "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": None}]}
    data = load(FLUX)
    data["extra"]["groupNodes"]["two_VAE_decode"] = {
        "nodes": [{**decode, "id": -1, "index": 0}, {**decode, "id": -1, "index": 1}], "links": [], "external": [],
        "config": {"1": {"input": {"samples": {"visible": False}, "vae": {"visible": False}}}}}
    decoder = node(data, 8)
    decoder["type"] = "workflow>two_VAE_decode"
    decoder["outputs"] = [{"name": "IMAGE", "type": "IMAGE", "links": [41]},
                          {"name": "VAEDecode IMAGE", "type": "IMAGE", "links": None}]
    api = ui_to_api(data, FLUX)
    assert api["8:0"]["inputs"] == {"samples": ["28:3", 0], "vae": ["10", 0]}
    assert api["8:1"]["inputs"] == {}
    assert api["26"]["inputs"]["images"] == ["8:0", 0]


def test_a_whole_txt2img_in_a_group_runs_on_a_tiny_sd15_file(models_dir: Path, tmp_path: Path) -> None:
    """Checkpoint, prompts, KSampler, VAEDecode and SaveImage in one group whose only input is the latent: the
    instance's eleven values (checkpoint name, both prompts, seed and control, steps, cfg, sampler, scheduler,
    denoise, file prefix) reach the inner nodes, and the SaveImage inside writes the image."""
    import numpy as np
    from PIL import Image

    from tests.dit_helpers import CPU
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    api = ui_to_api(load(TXT2IMG), TXT2IMG)
    assert api["10:0"]["inputs"] == {"ckpt_name": "tiny-sd15.safetensors"}
    assert api["10:1"]["inputs"]["text"] == "a red bicycle leaning on a wall"
    assert api["10:2"]["inputs"]["text"] == "blurry"
    assert {k: api["10:3"]["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} \
        == {"seed": 31337, "steps": 2, "cfg": 5.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
    assert api["10:3"]["inputs"]["latent_image"] == ["20", 0]
    assert api["10:5"]["inputs"] == {"filename_prefix": "grouped", "images": ["10:4", 0]}
    paths = ModelPaths(models_dir)
    assert not validate_workflow(Workflow.from_data(api, TXT2IMG), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("grouped*.png"))
    assert len(saved) == 1
    image = np.asarray(Image.open(saved[0]))
    assert image.shape[:2] == (48, 64) and image.std() > 0


def test_import_writes_the_expanded_graph(tmp_path: Path) -> None:
    """``tui-diffusion import`` as a user runs it on the file."""
    from tui_diffusion import cli

    out = tmp_path / "api.json"
    assert cli.main(["import", str(DATA / f"{INPAINT}.json"), "-o", str(out)]) == 0
    api = json.loads(out.read_text(encoding="utf-8"))
    api = api.get("prompt", api) if isinstance(api, dict) else api
    assert api["68:0"]["inputs"]["width"] == 640


def test_the_app_opens_a_group_node_file_flattened_as_untitled() -> None:
    """The app's document: the inner nodes under ComfyUI's ids, and a notice that saving writes a new file."""
    from tui_diffusion.document import WorkflowDocument

    document = WorkflowDocument.open(DATA / f"{VIDEO}.json")
    assert {"90:0", "90:7"} <= set(document.workflow.nodes)
    assert document.path is None and "group nodes" in (document.notice or "")


def test_the_flux_sampler_group_runs_on_tiny_files(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The group-node workflow imports, validates and runs on a tiny Flux schnell transformer, VAE and text
    encoders under the names it expects, its PreviewImage showing a 64x48 image. Like the real files it mirrors,
    it starts from EmptyLatentImage's 4-channel latent, which ComfyUI resizes (empty) to Flux's 16 channels."""
    import numpy as np
    from PIL import Image

    from tests.dit_helpers import CPU, shared_models
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    paths = ModelPaths(shared_models(tmp_path_factory))
    workflow = Workflow.load(DATA / f"{FLUX}.json")
    assert not validate_workflow(workflow, paths)
    api = ui_to_api(copy.deepcopy(load(FLUX)), FLUX)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    previews = sorted((tmp_path / "tmp").rglob("*.png"))
    assert len(previews) == 1
    image = np.asarray(Image.open(previews[0]))
    assert image.shape[:2] == (48, 64) and image.std() > 0

"""Workflow files and validation: torch-free, every problem named by node, title and input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, TXT2IMG, txt2img
from tui_diffusion.graph import NODE_SPECS, Workflow, WorkflowError, validate_workflow
from tui_diffusion.graph.samplers import SAMPLERS, SCHEDULERS
from tui_diffusion.paths import ModelPaths


@pytest.fixture()
def models(tmp_path: Path) -> ModelPaths:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / TINY).write_bytes(b"x")  # existence is all validation checks
    return ModelPaths(tmp_path)


def issues_of(data: dict, models: ModelPaths) -> list[str]:
    return [str(i) for i in validate_workflow(Workflow.from_data(data), models)]


def test_shipped_txt2img_has_comfyui_ids_and_is_valid(models: ModelPaths) -> None:
    wf = Workflow.load(TXT2IMG)
    assert {n: wf.class_type(n) for n in wf} == {
        "3": "KSampler", "4": "CheckpointLoaderSimple", "5": "EmptyLatentImage", "6": "CLIPTextEncode",
        "7": "CLIPTextEncode", "8": "VAEDecode", "9": "SaveImage",
    }
    assert issues_of(txt2img(), models) == []


def test_save_is_stable_pretty_and_round_trips(tmp_path: Path) -> None:
    wf = Workflow.from_data(txt2img())
    wf.nodes["3"]["extra"] = {"kept": True}  # unknown keys survive
    a = tmp_path / "a.json"
    wf.save(a)
    b = tmp_path / "b.json"
    Workflow.load(a).save(b)
    assert a.read_text() == b.read_text()
    text = a.read_text()
    assert text.startswith('{\n  "3": {\n    "inputs": {')
    assert json.loads(text)["3"]["extra"] == {"kept": True}
    assert list(json.loads(text)) == ["3", "4", "5", "6", "7", "8", "9"]


def test_edit_in_memory() -> None:
    wf = Workflow.from_data(txt2img())
    wf.set_input("3", "seed", 99)
    assert wf.inputs("3")["seed"] == 99
    assert wf.links("3")["model"].node_id == "4"
    assert wf.title("6") == "CLIP Text Encode (Prompt)"
    with pytest.raises(KeyError):
        wf.set_input("42", "seed", 1)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "malformed JSON at line 1"),
        ("[1, 2, 3]", "not a workflow"),
        ('{"3": {"inputs": {}}}', "node '3' has no 'class_type'"),
        ('{"nodes": [], "links": []}', "not a workflow"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "wf.json"
    path.write_text(content)
    with pytest.raises(WorkflowError) as err:
        Workflow.load(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_api_prompt_wrapper_is_accepted() -> None:
    wf = Workflow.from_data({"prompt": txt2img()})
    assert wf.class_type("3") == "KSampler"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["3"]["inputs"].update(steps=0), "node 3 'KSampler', input 'steps': 0 is below the minimum 1"),
        (lambda d: d["3"]["inputs"].update(cfg=-1), "node 3 'KSampler', input 'cfg': -1 is below the minimum 0"),
        (lambda d: d["5"]["inputs"].update(width=100),
         "node 5 'Empty Latent Image', input 'width': 100 is not a multiple of 8"),
        (lambda d: d["3"]["inputs"].update(sampler_name="nope"), "input 'sampler_name': 'nope' is not one of"),
        (lambda d: d["3"]["inputs"].update(seed="x"), "input 'seed': 'x' is not an integer"),
        (lambda d: d["4"]["inputs"].update(ckpt_name="missing.safetensors"),
         "node 4 'Load Checkpoint', input 'ckpt_name': 'missing.safetensors' not found in"),
        (lambda d: d["4"]["inputs"].update(ckpt_name="../../etc/passwd"), "points outside"),
        (lambda d: d["3"]["inputs"].pop("positive"), "node 3 'KSampler', input 'positive': required input is missing"),
        (lambda d: d["3"]["inputs"].update(positive=["99", 0]),
         "input 'positive': linked to node 99, which is not in the workflow"),
        (lambda d: d["3"]["inputs"].update(model=["4", 5]), "input 'model': linked to output 5 of node 4"),
        (lambda d: d["3"]["inputs"].update(positive=["5", 0]),
         "node 3 'KSampler', input 'positive': expects CONDITIONING but is linked to LATENT"),
        (lambda d: d["6"].update(class_type="FancyNode"),
         "node 6 'CLIP Text Encode (Prompt)': 'FancyNode' is a custom node type"),
        (lambda d: d["9"].update(class_type="Nothing"), "no output node"),
        (lambda d: d["6"]["inputs"].update(clip=["3", 0]), "cycle"),
    ],
)
def test_validation_names_node_and_input(models: ModelPaths, change, expected: str) -> None:
    data = txt2img()
    change(data)
    found = issues_of(data, models)
    assert any(expected in i for i in found), found


def test_every_problem_is_reported_at_once(models: ModelPaths) -> None:
    data = txt2img(**{"3.steps": 0, "3.cfg": -1, "5.width": 100})
    assert len(issues_of(data, models)) == 3


def test_no_checkpoint_at_all_says_how_to_get_one(tmp_path: Path) -> None:
    found = issues_of(txt2img(), ModelPaths(tmp_path))
    assert any("demo-checkpoint" in i and "civitai" in i for i in found), found


def test_pickle_checkpoints_are_refused(models: ModelPaths) -> None:
    (models.root / "checkpoints" / "old.ckpt").write_bytes(b"x")
    found = issues_of(txt2img(**{"4.ckpt_name": "old.ckpt"}), models)
    assert any("pickle" in i for i in found), found


def test_specs_follow_comfyui_names_and_defaults() -> None:
    ks = NODE_SPECS["KSampler"]
    assert [i.name for i in ks.inputs] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                           "negative", "latent_image", "denoise"]
    assert (ks.input("steps").default, ks.input("cfg").default, ks.input("denoise").default) == (20, 8.0, 1.0)
    assert ks.input("seed").control_after_generate and ks.input("seed").max == 0xFFFFFFFFFFFFFFFF
    assert set(SAMPLERS) >= {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m",
                             "dpmpp_sde", "ddim", "uni_pc", "pndm"}
    assert set(SCHEDULERS) >= {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"}
    lat = NODE_SPECS["EmptyLatentImage"]
    assert (lat.input("width").default, lat.input("width").min, lat.input("width").step) == (512, 16, 8)
    assert [o.type for o in NODE_SPECS["CheckpointLoaderSimple"].outputs] == ["MODEL", "CLIP", "VAE"]
    assert NODE_SPECS["CLIPTextEncode"].input("text").multiline
    assert NODE_SPECS["SaveImage"].output_node and NODE_SPECS["SaveImage"].input("filename_prefix").default == "ComfyUI"

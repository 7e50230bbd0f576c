"""Bad input never ends in a traceback: random workflows and UI files give a message or a valid graph;
every file-name input refuses to leave its folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TINY, txt2img
from tui_diffusion.graph import NODE_SPECS, Workflow, WorkflowError, validate_workflow
from tui_diffusion.paths import ModelPaths

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
node_ids = st.sampled_from(["1", "2", "3", "4", "5", "x"])
links = st.lists(st.one_of(node_ids, st.integers(-2, 10)), min_size=2, max_size=2).map(
    lambda v: [v[0], v[1] if isinstance(v[1], int) else 0])
class_types = st.one_of(st.sampled_from(sorted(NODE_SPECS)), st.text(max_size=12))
input_names = st.one_of(st.sampled_from(sorted({i.name for s in NODE_SPECS.values() for i in s.inputs})),
                        st.text(max_size=8))
nodes = st.fixed_dictionaries({"class_type": class_types,
                               "inputs": st.dictionaries(input_names, st.one_of(values, links), max_size=6)})
workflows = st.dictionaries(node_ids, st.one_of(nodes, values), max_size=6)


def _models(tmp: Path) -> ModelPaths:
    (tmp / "checkpoints").mkdir(exist_ok=True)
    (tmp / "checkpoints" / TINY).write_bytes(b"x")
    return ModelPaths(tmp)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(workflows, values))
def test_random_workflows_validate_or_are_refused_with_a_message(data: object, tmp_path: Path) -> None:
    try:
        wf = Workflow.from_data(data, "fuzz.json")
    except WorkflowError as exc:
        assert "fuzz.json" in str(exc)
        return
    for issue in validate_workflow(wf, _models(tmp_path)):
        assert str(issue)


ui_links = st.lists(st.one_of(st.integers(-1, 8), st.text(max_size=3)), min_size=0, max_size=7)
ui_nodes = st.fixed_dictionaries(
    {"id": st.integers(-1, 8), "type": st.one_of(class_types, st.sampled_from(["Reroute", "PrimitiveNode", "Note"])),
     "mode": st.sampled_from([0, 2, 4, 7]),
     "inputs": st.lists(st.fixed_dictionaries({"name": input_names, "type": st.text(max_size=6),
                                               "link": st.one_of(st.none(), st.integers(-1, 9))}), max_size=4),
     "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "type": st.text(max_size=6),
                                                "links": st.lists(st.integers(0, 9), max_size=3)}), max_size=3),
     "widgets_values": st.one_of(st.lists(scalars, max_size=8), st.dictionaries(input_names, scalars, max_size=3))})


@settings(max_examples=300, deadline=None)
@given(nodes=st.lists(ui_nodes, max_size=6), links=st.lists(ui_links, max_size=8))
def test_random_ui_files_import_or_are_refused_with_a_message(nodes: list, links: list) -> None:
    try:
        wf = Workflow.from_data({"nodes": nodes, "links": links}, "fuzz-ui.json")
    except WorkflowError as exc:
        assert "fuzz-ui.json" in str(exc)
        return
    for issue in validate_workflow(wf):
        assert str(issue)


TRAVERSALS = ["../../../etc/passwd", "/etc/passwd", "..", "sub/../../x.safetensors", "..\\windows.safetensors"]


def _wired(node: str, name: str) -> tuple[dict, str, str]:
    """txt2img with a node of type ``node`` whose file-name input is ``name``, wired so that it is needed."""
    data = txt2img(**{"4.ckpt_name": TINY})
    if node == "CheckpointLoaderSimple":
        data["4"]["inputs"]["ckpt_name"] = name
        return data, "4", "ckpt_name"
    if node == "VAELoader":
        data["20"] = {"class_type": node, "inputs": {"vae_name": name}}
        data["8"]["inputs"]["vae"] = ["20", 0]
        return data, "20", "vae_name"
    if node == "LoadImage":
        data["20"] = {"class_type": node, "inputs": {"image": name}}
        data["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
        return data, "20", "image"
    if node == "LoadImageMask":
        data["20"] = {"class_type": node, "inputs": {"image": name, "channel": "alpha"}}
        data["21"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["20", 0]}}
        data["3"]["inputs"]["latent_image"] = ["21", 0]
        return data, "20", "image"
    data["20"] = {"class_type": node, "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": name,
                                                 "strength_model": 1.0, "strength_clip": 1.0}}
    data["3"]["inputs"]["model"] = ["20", 0]
    return data, "20", "lora_name"


@pytest.mark.parametrize("name", TRAVERSALS)
@pytest.mark.parametrize("node", ["CheckpointLoaderSimple", "VAELoader", "LoadImage", "LoadImageMask", "LoraLoader"])
def test_file_names_cannot_leave_their_folder(tmp_path: Path, name: str, node: str) -> None:
    data, node_id, field = _wired(node, name)
    issues = [str(i) for i in validate_workflow(Workflow.from_data(data), _models(tmp_path))]
    mine = [i for i in issues if f"node {node_id} " in i and f"input '{field}'" in i]
    assert len(mine) == 1, issues
    assert "outside" in mine[0] or "not a relative name" in mine[0] or "not found" in mine[0]


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "a/../../b"])
def test_filename_prefix_cannot_leave_the_output_folder(tmp_path: Path, prefix: str) -> None:
    from PIL import Image

    from tui_diffusion.paths import PathError
    from tui_diffusion.store.outputs import save_png

    with pytest.raises(PathError):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "out", prefix, {})
    assert not any(tmp_path.parent.glob("escape*"))


def test_a_pickle_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    import pickle

    from tui_diffusion.modelfiles.header import CheckpointError
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.settings import DevicePolicy

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path, resolve_device(DevicePolicy("cpu")), tmp_path)
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(path.read_bytes())  # a pickle pretending to be safetensors
    with pytest.raises(CheckpointError, match="not a safetensors file|header"):
        load_checkpoint(renamed, resolve_device(DevicePolicy("cpu")), tmp_path)
    assert not marker.exists()

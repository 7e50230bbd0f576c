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
                    st.text(max_size=20), st.integers(-10**400, 10**400))  # too big for a float
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


# -- every parser: a clear error or a result, never another exception, never a hang (issue 14) ----------------
# Each test below is bounded (max_examples) so that together they add well under 40 s to a CI run; a per-example
# deadline catches a hang (the old A1111 field regex was cubic, deep JSON blew the stack).
FUZZ = settings(max_examples=80, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
nesting = st.integers(0, 3000).map(lambda d: "[" * d + "]" * d)
big_ints = st.integers(1, 6000).map(lambda n: "9" * n)
json_texts = st.one_of(
    st.builds(lambda v: __import__("json").dumps(v), st.one_of(workflows, values)),
    st.builds(lambda d, v: '{"3": {"class_type": "KSampler", "inputs": {"seed": %s}}}' % (d or v), nesting, big_ints),
    st.text(max_size=200),
)


def _is_clear(message: str, source: str) -> bool:
    """A message a user can act on: it names the file and carries no raw control characters."""
    return source in message and "Traceback" not in message


@FUZZ
@given(content=st.one_of(json_texts.map(str.encode), st.binary(max_size=300)))
def test_fuzz_workflow_files(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.json"
    path.write_bytes(content)
    try:
        wf = Workflow.load(path)
    except WorkflowError as exc:
        assert _is_clear(str(exc), "fuzz.json"), exc
        return
    for issue in validate_workflow(wf):
        assert str(issue)


anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)
ui_like = st.fixed_dictionaries({"nodes": st.lists(st.one_of(ui_nodes, anything), max_size=5),
                                 "links": st.one_of(st.lists(st.one_of(ui_links, anything), max_size=6), anything)},
                                optional={"definitions": anything})


@FUZZ
@given(data=ui_like)
def test_fuzz_ui_shaped_garbage_imports_and_exports_or_is_refused(data: dict) -> None:
    from tui_diffusion.graph.ui_format import api_to_ui

    try:
        wf = Workflow.from_data(data, "fuzz-ui.json")
    except WorkflowError as exc:
        assert _is_clear(str(exc), "fuzz-ui.json"), exc
        return
    api_to_ui(wf.to_data())  # what 'export' does with it


def _png_with(chunks: list[tuple[bytes, bytes]]) -> bytes:
    from tests.test_attack_inputs import _chunk

    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, data) for kind, data in chunks)


chunk_kinds = st.one_of(st.sampled_from([b"IHDR", b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"IEND"]),
                        st.binary(min_size=4, max_size=4))
text_payloads = st.one_of(
    st.builds(lambda k, t: k + b"\0" + t, st.sampled_from([b"prompt", b"workflow", b"parameters", b"x"]),
              st.one_of(json_texts.map(lambda s: s.encode("utf-8", "replace")), st.binary(max_size=100))),
    st.binary(max_size=100))


@FUZZ
@given(chunks=st.lists(st.tuples(chunk_kinds, text_payloads), max_size=6), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(8, 400), st.integers(0, 255)), max_size=3))
def test_fuzz_png_chunks(chunks: list, cut: int, flips: list, tmp_path: Path) -> None:
    from tests.test_attack_inputs import png_bytes

    raw = bytearray(_png_with(chunks) if chunks else png_bytes(text={"prompt": "{}"}))
    for at, byte in flips:
        if at < len(raw):
            raw[at] = byte
    path = tmp_path / "fuzz.png"
    path.write_bytes(bytes(raw[: max(cut, 8)] if cut < len(raw) else raw))
    try:
        Workflow.load(path)
    except WorkflowError as exc:
        assert _is_clear(str(exc), "fuzz.png"), exc


field_keys = st.one_of(st.sampled_from(["Steps", "Seed", "Size", "CFG scale", "Sampler", "Schedule type", "Model",
                                        "Denoising strength", "Lora hashes"]), st.text(max_size=8))
field_values = st.one_of(st.text(max_size=12), big_ints, st.integers(-10**30, 10**30).map(str),
                         st.builds(lambda a, b: f"{a}x{b}", st.integers(-5, 10**12), st.integers(0, 10**12)),
                         st.text(max_size=10).map(lambda t: f'"{t}"'), st.just(" " * 3000))
a1111_texts = st.one_of(
    st.text(max_size=300),
    st.builds(lambda prompt, negative, fields: prompt + ("\nNegative prompt: " + negative if negative else "")
              + "\nSteps: " + ", ".join(f"{k}: {v}" for k, v in fields),
              st.text(max_size=40), st.text(max_size=20), st.lists(st.tuples(field_keys, field_values), max_size=8)))


@FUZZ
@given(text=a1111_texts)
def test_fuzz_a1111_parameters(text: str) -> None:
    from tui_diffusion.graph.a1111 import parse_parameters, txt2img_from_parameters

    assert isinstance(parse_parameters(text)["fields"], dict)
    wf = Workflow.from_data(txt2img_from_parameters(text), "a1111")
    for issue in validate_workflow(wf):
        assert str(issue)


dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL"]), st.text(max_size=5))
dims = st.one_of(st.integers(0, 8), st.integers(-3, 2**70), st.text(max_size=3), st.booleans(), st.floats(), st.none())
tensor_names = st.one_of(st.sampled_from(["model.diffusion_model.input_blocks.0.0.weight",
                                          "cond_stage_model.transformer.text_model.x", "__metadata__",
                                          "conditioner.embedders.1.model.x", "model.diffusion_model.x"]),
                         st.text(max_size=10))
entries = st.one_of(
    st.fixed_dictionaries({"dtype": dtypes, "shape": st.one_of(st.lists(dims, max_size=5), anything),
                           "data_offsets": st.one_of(st.lists(dims, min_size=2, max_size=2), anything)}),
    anything)


@FUZZ
@given(header=st.one_of(st.dictionaries(tensor_names, entries, max_size=5).map(lambda h: __import__("json").dumps(h)),
                        json_texts, nesting),
       raw=st.binary(max_size=40), data_len=st.integers(0, 64), length_delta=st.integers(-4, 4))
def test_fuzz_safetensors_headers(header: str, raw: bytes, data_len: int, length_delta: int,
                                  tmp_path: Path) -> None:
    import struct

    from tui_diffusion.modelfiles.describe import describe_checkpoint
    from tui_diffusion.modelfiles.header import CheckpointError, read_header

    body = header.encode("utf-8", "replace") if header else raw
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(body) + length_delta)) + body + b"\0" * data_len)
    try:
        read_header(path)
    except CheckpointError as exc:
        assert _is_clear(str(exc), "fuzz.safetensors"), exc
    row = describe_checkpoint(path, "fuzz.safetensors")  # what 'models' shows: never raises
    assert row["name"] == "fuzz.safetensors" and (row["error"] is None or isinstance(row["error"], str))


yaml_kinds = st.sampled_from(["base_path", "checkpoints", "loras", "vae", "embeddings", "upscale_models", "other"])
yaml_docs = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.text(max_size=8), st.one_of(st.dictionaries(yaml_kinds, anything, max_size=4), anything),
                    max_size=3).map(lambda d: __import__("yaml").safe_dump(d)),
    st.integers(0, 1100).map(lambda d: "[" * d + "]" * d),  # PyYAML is slow on deep nesting: just past the stack
    big_ints.map(lambda n: f"a:\n  checkpoints: {n}\n"), st.binary(max_size=60).map(
        lambda b: b.decode("latin-1")))


@settings(FUZZ, max_examples=40)
@given(doc=yaml_docs)
def test_fuzz_extra_model_paths_yaml(doc: str, tmp_path: Path) -> None:
    from tui_diffusion.config import ConfigError, Settings, resolve

    path = tmp_path / "extra_model_paths.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogateescape")
    base = resolve({})
    try:
        Settings({**base.values, "extra_model_paths": path}, base.sources).model_paths()
    except ConfigError as exc:
        assert "extra_model_paths.yaml" in str(exc), exc


def _toml_value(value: object) -> str:
    """A TOML rendering of a JSON-like value (tomllib reads TOML; nothing in the standard library writes it)."""
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return '""'


setting_names = st.one_of(st.sampled_from(["models_dir", "output_dir", "device", "memory", "precision",
                                           "max_checkpoints", "compile", "allow_pickle", "max_side", "max_batch",
                                           "max_prompt_chars", "theme", "extra_model_paths"]), st.text(max_size=6))
toml_docs = st.one_of(
    st.text(max_size=200),
    st.dictionaries(setting_names, st.one_of(anything.filter(lambda v: v is not None), big_ints, st.floats()),
                    max_size=5).map(lambda d: "\n".join(f"{__import__('json').dumps(k)} = {_toml_value(v)}"
                                                        for k, v in d.items() if v is not None)),
    nesting.map(lambda n: f"max_side = {n or 1}"), big_ints.map(lambda n: f"max_side = {n}"),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(doc=toml_docs, env=st.one_of(st.none(), st.text(max_size=30), big_ints))
def test_fuzz_toml_settings_file_and_environment(doc: str, env: str | None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_diffusion.config import ConfigError, resolve

    path = tmp_path / "config.toml"
    path.write_text(doc, encoding="utf-8", errors="surrogateescape")
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(path))
    if env is None or "\0" in env:
        monkeypatch.delenv("TUI_DIFFUSION_MAX_SIDE", raising=False)
    else:
        monkeypatch.setenv("TUI_DIFFUSION_MAX_SIDE", env)
    try:
        resolved = resolve()
    except ConfigError as exc:
        assert "config.toml" in str(exc) or "TUI_DIFFUSION_MAX_SIDE" in str(exc), exc
        return
    assert isinstance(resolved.values["max_side"], int) and resolved.values["max_side"] >= 1
    resolved.limits()


message_fields = st.one_of(anything, st.text(max_size=200), st.integers(), workflows)


def _message(kind: str, job_id: object, workflow: object, previews: object) -> object:
    from tui_diffusion import messages as m

    cls = getattr(m, kind)
    return {"SubmitJob": lambda: cls(job_id, workflow, previews), "StopServer": cls}.get(kind, lambda: cls(job_id))()


def _check_accepted(decoded: object) -> None:
    """What the server does after decoding: ``invalid_command``, which must answer for any object; what it
    accepts, the worker reads as a workflow (a WorkflowError fails that job with a message)."""
    from tui_diffusion import messages as m
    from tui_diffusion.server import invalid_command

    why = invalid_command(decoded)
    assert why is None or isinstance(why, str)
    if why is None and isinstance(decoded, m.SubmitJob):
        try:
            Workflow.from_data(decoded.workflow, "socket")
        except WorkflowError as exc:
            assert _is_clear(str(exc), "socket"), exc


@FUZZ
@given(kind=st.sampled_from(["SubmitJob", "CancelJob", "MoveJob", "StopServer"]), job_id=message_fields,
       workflow=message_fields, previews=message_fields)
def test_fuzz_server_messages_with_any_field_values(kind: str, job_id: object, workflow: object,
                                                    previews: object) -> None:
    """A key holder's message of a known kind with anything in its fields, through a pickle round trip
    (what the socket carries): refused with a reason, or a workflow the worker can read."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    _check_accepted(ForkingPickler.loads(pickle.dumps(_message(kind, job_id, workflow, previews))))


@settings(FUZZ, max_examples=60)
@given(kind=st.sampled_from(["SubmitJob", "CancelJob", "MoveJob"]), job_id=message_fields,
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=3))
def test_fuzz_server_messages_decoded_from_corrupted_bytes(kind: str, job_id: object, flips: list) -> None:
    """Corrupted bytes: any decoding failure costs only that client its connection (the server's reader
    catches it); whatever does decode must still get an answer from ``invalid_command``."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    raw = bytearray(pickle.dumps(_message(kind, job_id, {"1": {"class_type": "X", "inputs": {}}}, False)))
    for at, byte in flips:
        if at < len(raw):
            raw[at] = byte
    try:
        decoded = ForkingPickler.loads(bytes(raw))
    except Exception:  # noqa: BLE001 - the server's reader catches every decoding failure
        return
    _check_accepted(decoded)

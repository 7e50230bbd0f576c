"""Input an attacker (or an unlucky user) hands the program: each case once ended in a traceback, a hang or
gigabytes of memory (issue 14, items 6, 7, 8, 10, 12, 13) and must now end in a clear message naming the
file, or in a result."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from tests.conftest import TXT2IMG, txt2img
from tui_diffusion import cli
from tui_diffusion.graph import Workflow, WorkflowError
from tui_diffusion.graph.a1111 import parse_parameters, txt2img_from_parameters
from tui_diffusion.graph.ui_format import api_to_ui, ui_to_api
from tui_diffusion.graph.values import parse_value
from tui_diffusion.modelfiles.describe import describe_checkpoint
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.text import printable

ESC_NAME = "a\x1b]0;PWN\x07b.safetensors"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int = 8, height: int = 8, text: dict[str, str] | None = None, *, bit_depth: int = 8,
              colour: int = 2, idat: bytes | None = None, compressed: dict[str, bytes] | None = None) -> bytes:
    """A PNG written chunk by chunk: any size in its header, whatever pixel data (never decoded here)."""
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
    for key, value in (text or {}).items():
        out += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    for key, value in (compressed or {}).items():
        out += _chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + value)
    out += _chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\0" * 8))
    return out + _chunk(b"IEND", b"")


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# -- item 6: deep nesting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [500, 100_000])
def test_deeply_nested_workflow_files_are_refused_by_name(tmp_path: Path, levels: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"3": {"class_type": "KSampler", "inputs": {"seed": ' + _deep(levels) + "}}}")
    with pytest.raises(WorkflowError, match=r"deep\.json: .*nested"):
        Workflow.load(path)


def test_deep_nesting_as_a_whole_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"3": ' + _deep(100_000) + "}")
    with pytest.raises(WorkflowError, match=r"deep\.json: .*nested"):
        Workflow.load(path)


def test_deeply_nested_ui_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.ui.json"
    path.write_text('{"nodes": [{"id": 1, "type": "KSampler", "widgets_values": ' + _deep(600) + '}], "links": []}')
    with pytest.raises(WorkflowError, match=r"deep\.ui\.json: .*nested"):
        Workflow.load(path)


def test_deeply_nested_prompt_chunk_in_a_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(text={"prompt": '{"3": ' + _deep(50_000) + "}"}))
    with pytest.raises(WorkflowError, match=r"deep\.png: .*'prompt' chunk is unreadable.*nested"):
        Workflow.load(path)


def test_from_data_refuses_deep_data_from_any_caller() -> None:
    data: object = 1
    for _ in range(5000):
        data = [data]
    with pytest.raises(WorkflowError, match="socket: .*nested"):
        Workflow.from_data({"3": {"class_type": "KSampler", "inputs": {"seed": data}}}, "socket")


def test_a_long_reroute_chain_imports_without_recursion() -> None:
    """5000 Reroutes between a checkpoint loader and a sampler: followed in a loop, not by recursion."""
    n = 5000
    nodes = [{"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["m.safetensors"], "outputs": []}]
    links = [[1, 1, 0, 2, 0, "MODEL"]]
    for i in range(2, n + 2):
        nodes.append({"id": i, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": i - 1}]})
        links.append([i, i, 0, i + 1, 0, "MODEL"])
    nodes.append({"id": n + 2, "type": "KSampler", "inputs": [{"name": "model", "type": "MODEL", "link": n + 1}],
                  "widgets_values": [1, "fixed", 20, 8.0, "euler", "normal", 1.0]})
    api = ui_to_api({"nodes": nodes, "links": links})
    assert api[str(n + 2)]["inputs"]["model"] == ["1", 0]


def test_exporting_a_long_chain_to_the_ui_format_does_not_recurse() -> None:
    api = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for i in range(2, 3000):
        api[str(i)] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i - 1), 0],
                                                                   "upscale_method": "nearest-exact",
                                                                   "scale_by": 1.0}}
    ui = api_to_ui(api)
    columns = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert columns[2999] > columns[1000] > columns[1]


def _chain(n: int) -> dict:
    """A latent upscaled n - 2 times, the links running from high ids to low (so that walks recurse deepest)."""
    api = {str(n): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    for i in range(n - 1, 1, -1):
        api[str(i)] = {"class_type": "LatentUpscaleBy",
                       "inputs": {"samples": [str(i + 1), 0], "upscale_method": "nearest-exact", "scale_by": 1.0}}
    api["1"] = {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "x"}}
    return api


def test_a_chain_of_thousands_of_linked_nodes_is_refused_by_name() -> None:
    """Validation and the executor walk links recursively: such a chain once ended in a RecursionError."""
    with pytest.raises(WorkflowError, match=r"chain\.json: .*chain of more than 400 linked nodes"):
        Workflow.from_data(_chain(3000), "chain.json")


def test_a_chain_just_under_the_limit_validates() -> None:
    from tui_diffusion.graph import validate_workflow

    wf = Workflow.from_data(_chain(399))
    assert not [i for i in validate_workflow(wf) if "cycle" in i.message]


# -- item 7: integers of more than 4300 digits ---------------------------------------------------------------
def test_a_5000_digit_integer_in_a_workflow_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"3": {"class_type": "KSampler", "inputs": {"seed": %s}}}' % ("9" * 5000))
    with pytest.raises(WorkflowError, match=r"big\.json: .*4300 digits"):
        Workflow.load(path)


def test_integers_too_big_for_a_float_fail_validation_with_a_message() -> None:
    from tui_diffusion.graph import validate_workflow

    data = txt2img(**{"3.seed": 10**400, "3.cfg": 10**400, "5.width": -(10**400)})
    issues = {(i.node_id, i.input): i.message for i in validate_workflow(Workflow.from_data(data))}
    assert "above the maximum" in issues[("3", "seed")] and "above the maximum" in issues[("3", "cfg")]
    assert "below the minimum" in issues[("5", "width")]


@pytest.mark.parametrize("line", ["max_side = inf", "max_side = nan", "max_side = 2.5", "max_side = -4",
                                  "max_side = " + "9" * 5000, "max_side = " + "[" * 3000 + "]" * 3000,
                                  "max_batch = true", "theme = {a = 1}", "models_dir = [1, 2]",
                                  'models_dir = "a\\u0000b"'],
                         ids=["inf", "nan", "fraction", "negative", "5000-digits", "deep", "bool", "table", "list",
                              "nul"])
def test_bad_values_in_the_settings_file_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           line: str) -> None:
    from tui_diffusion.config import ConfigError, resolve

    (tmp_path / "config.toml").write_text(line + "\n")
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(tmp_path / "config.toml"))
    with pytest.raises(ConfigError, match="config.toml"):
        resolve()


def test_a_settings_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_diffusion.config import ConfigError, resolve

    (tmp_path / "config.toml").write_bytes(b'theme = "\xff\xfe"\n')
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(tmp_path / "config.toml"))
    with pytest.raises(ConfigError, match="config.toml: not a TOML settings file"):
        resolve()


@pytest.mark.parametrize("content", [b"a:\n  checkpoints: " + b"9" * 5000 + b"\n", b"\xff\xfe: x\n",
                                     b"[" * 1100 + b"]" * 1100], ids=["5000-digits", "not-utf8", "deep"])
def test_an_unreadable_extra_model_paths_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    from tui_diffusion.config import ConfigError, Settings, resolve

    path = tmp_path / "extra_model_paths.yaml"
    path.write_bytes(content)
    base = resolve({})
    with pytest.raises(ConfigError, match="extra_model_paths.yaml"):
        Settings({**base.values, "extra_model_paths": path}, base.sources).model_paths()


def test_a_5000_digit_a1111_seed_is_ignored_not_a_traceback(tmp_path: Path) -> None:
    text = f"a fox\nSteps: 12, Seed: {'9' * 5000}, Size: {'9' * 5000}x64"
    api = txt2img_from_parameters(text)
    assert api["3"]["inputs"]["steps"] == 12 and api["3"]["inputs"]["seed"] == 0
    assert api["5"]["inputs"]["width"] == 512  # the size did not parse: the default stays
    path = tmp_path / "a1111.png"
    path.write_bytes(png_bytes(text={"parameters": text}))
    assert Workflow.load(path).inputs("3")["steps"] == 12


def test_a_huge_integer_on_the_command_line_is_a_usage_error() -> None:
    assert parse_value(None, "9" * 5000) == "9" * 5000  # an unknown input: kept as text
    wf = Workflow.load(TXT2IMG)
    with pytest.raises(cli.UsageError, match="too long for an integer"):
        cli.apply_sets(wf, ["3.seed=" + "9" * 5000])


def test_a1111_lines_with_long_runs_of_spaces_parse_in_linear_time() -> None:
    """The old field regex backtracked cubically: 3000 spaces took minutes."""
    start = time.perf_counter()
    parsed = parse_parameters("a fox\nSteps: 20, Seed: 5," + " " * 200_000 + "x, Sampler: Euler")
    assert time.perf_counter() - start < 2
    assert parsed["fields"]["Steps"] == "20" and parsed["fields"]["Sampler"] == "Euler"


# -- item 8: decompression bombs -------------------------------------------------------------------------------
def test_a_decompression_bomb_png_opens_as_a_workflow_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(60000, 60000, {"prompt": json.dumps(txt2img(**{"3.seed": 7}))}, bit_depth=1,
                               colour=0, idat=zlib.compress(b"\0" * 100_000)))
    assert Workflow.load(path).inputs("3")["seed"] == 7


def test_opening_a_png_as_a_workflow_decodes_no_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image, ImageFile

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "big.png"
    Image.new("RGB", (8, 8)).save(path)
    path.write_bytes(png_bytes(9000, 9000, {"prompt": json.dumps(txt2img(**{"3.seed": 9}))}))
    assert Workflow.load(path).inputs("3")["seed"] == 9


def test_a_compressed_text_chunk_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ztxt.png"
    path.write_bytes(png_bytes(compressed={"prompt": zlib.compress(b" " * (40 * 2**20), 9)}))
    with pytest.raises(WorkflowError, match=r"ztxt\.png: a damaged PNG .*more than"):
        Workflow.load(path)


def test_text_chunks_after_the_pixels_and_compressed_ones_are_read(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from tui_diffusion.images import png_text_chunks

    info = PngInfo()
    info.add_text("prompt", json.dumps(txt2img()), zip=True)
    info.add_itxt("workflow", "ünïcode", zip=True)
    info.add_itxt("parameters", "plain ✓")
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png", pnginfo=info)
    with Image.open(tmp_path / "p.png") as im:
        im.load()
        expected = dict(im.text)
    assert png_text_chunks(tmp_path / "p.png") == expected
    raw = (tmp_path / "p.png").read_bytes()  # a tEXt chunk moved after IDAT, which the PNG format allows
    late = raw[:-12] + _chunk(b"tEXt", b"late\0value") + raw[-12:]
    (tmp_path / "late.png").write_bytes(late)
    assert png_text_chunks(tmp_path / "late.png")["late"] == "value"


@pytest.mark.parametrize("size", [(60000, 60000), (9000, 9000)])
def test_images_are_size_checked_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    from tui_diffusion.images import ImageFileError, open_image

    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(*size, idat=zlib.compress(b"\0" * 1000)))
    with pytest.raises(ImageFileError, match="pixels"):
        open_image(path)


# -- item 10: crafted safetensors headers ----------------------------------------------------------------------
def _safetensors(path: Path, header_json: str, data: bytes = b"\0" * 16) -> Path:
    raw = header_json.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _sd1_header(conv_shape: list[int]) -> str:
    return json.dumps({
        "model.diffusion_model.input_blocks.0.0.weight": {"dtype": "F32", "shape": conv_shape,
                                                           "data_offsets": [0, 16]},
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": {"dtype": "F32", "shape": [0],
                                                                           "data_offsets": [16, 16]},
    })


CRAFTED = {
    "string-offsets": '{"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}',
    "deep": '{"w": ' + _deep(100_000) + "}",
    "big-int": '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 16]}}',
    "one-d-conv": _sd1_header([4]),
    "string-shape": '{"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}',
    "bool-shape": '{"w": {"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}}',
    "float-offsets": '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.5]}}',
    "huge-dims": json.dumps({"w": {"dtype": "F32", "shape": [2**63] * 5000, "data_offsets": [0, 16]}}),
}


def test_models_lists_every_file_and_says_why_a_crafted_one_is_unreadable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    _safetensors(folder / "good.safetensors", _sd1_header([1, 4, 1, 1]))
    for name, header in CRAFTED.items():
        _safetensors(folder / f"{name}.safetensors", header)
    assert cli.main(["models", "--models-dir", str(tmp_path / "models"), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good.safetensors"]["family"] == "SD1.x" and rows["good.safetensors"]["error"] is None
    for name in CRAFTED:
        row = rows[f"{name}.safetensors"]
        assert row["supported"] is False and row["error"], row
    assert "dimensions" in rows["one-d-conv.safetensors"]["error"]
    assert "nested too deeply" in rows["deep.safetensors"]["error"]


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_headers_are_checkpoint_errors_naming_the_file(tmp_path: Path, name: str) -> None:
    path = _safetensors(tmp_path / f"{name}.safetensors", CRAFTED[name])
    if name == "one-d-conv":  # a readable header; what uses the conv weight checks its rank
        from tui_diffusion.modelfiles.header import require_rank

        with pytest.raises(CheckpointError, match=f"{name}.safetensors: .*dimensions"):
            require_rank(path, read_header(path), "model.diffusion_model.input_blocks.0.0.weight", 4)
        return
    with pytest.raises(CheckpointError, match=rf"{name}\.safetensors: "):
        read_header(path)


def test_loading_a_checkpoint_with_1d_sd1_shapes_fails_naming_the_file(tmp_path: Path) -> None:
    """What a job's CheckpointLoaderSimple does with it: once an IndexError that named no file."""
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.settings import DevicePolicy

    header = json.loads(_sd1_header([4]))
    header["model.diffusion_model.out.2.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    path = _safetensors(tmp_path / "crafted.safetensors", json.dumps(header), b"\0" * 32)
    with pytest.raises(CheckpointError, match=r"crafted\.safetensors: not a usable checkpoint"):
        load_checkpoint(path, resolve_device(DevicePolicy("cpu")), tmp_path / "cfg")


def test_an_empty_tensor_with_a_huge_dimension_is_still_valid(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "e.safetensors",
                        json.dumps({"w": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]}}), b"")
    assert read_header(path)["w"].shape == (2**40, 0)


def test_a_diffusers_folder_with_a_bad_model_index_is_listed_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": {"not": "a string"}}')
    row = describe_checkpoint(folder, "weird")
    assert row["supported"] is False and "model_index.json" in row["error"]


# -- item 12: names with control characters --------------------------------------------------------------------
def test_printable_escapes_controls_and_nothing_else() -> None:
    assert printable(ESC_NAME) == "a\\x1b]0;PWN\\x07b.safetensors"
    assert printable("fox ✓ 狐.safetensors") == "fox ✓ 狐.safetensors"
    assert printable("a\u202eb\x9bc\udcffd") == "a\\u202eb\\x9bc\\udcffd"
    assert printable("two\nlines") == "two\\x0alines"
    assert printable("two\nlines", keep_newlines=True) == "two\nlines"


def test_models_prints_file_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    _safetensors(folder / ESC_NAME, _sd1_header([1, 4, 1, 1]))
    assert cli.main(["models", "--models-dir", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "a\\x1b]0;PWN\\x07b.safetensors" in out


def test_validation_errors_print_names_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    _safetensors(folder / ESC_NAME, _sd1_header([1, 4, 1, 1]))
    data = txt2img(**{"4.ckpt_name": "missing.safetensors"})
    data["9"]["_meta"] = {"title": "Save\x1b[2J"}
    (tmp_path / "wf.json").write_text(json.dumps(data))
    (tmp_path / "out").mkdir()
    assert cli.main(["validate", str(tmp_path / "wf.json"), "--models-dir", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "a\\x1b]0;PWN\\x07b.safetensors" in err
    assert "\x1b" not in err and "\x07" not in err


def test_node_titles_are_shown_escaped() -> None:
    data = txt2img()
    data["3"]["_meta"] = {"title": "K\x1b]0;PWN\x07"}
    wf = Workflow.from_data(data)
    assert wf.title("3") == "K\\x1b]0;PWN\\x07" and "\x1b" not in wf.describe("3")


# -- item 13: sweeps are sized before anything is built --------------------------------------------------------
def test_a_million_job_sweep_is_refused_at_once_without_growing_memory() -> None:
    wf = Workflow.load(TXT2IMG)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(cli.UsageError, match="1000 x 1000 = 1000000 jobs, more than the 10000"):
            cli.expand_sweeps(wf, ["3.seed=1..1000", "3.steps=1..1000"])
        with pytest.raises(cli.UsageError, match="more than the 10000"):
            cli.expand_sweeps(wf, ["3.seed=" + ",".join(map(str, range(200)))] * 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50 * 2**20


def test_sweep_jobs_are_built_lazily_in_product_order() -> None:
    wf = Workflow.load(TXT2IMG)
    sweep = cli.expand_sweeps(wf, ["3.seed=1,2", "3.steps=5..7"])
    assert len(sweep) == 6
    assert [(j.inputs("3")["seed"], j.inputs("3")["steps"]) for j in sweep] == [
        (1, 5), (1, 6), (1, 7), (2, 5), (2, 6), (2, 7)]
    assert sweep[-1].inputs("3")["steps"] == 7 and wf.inputs("3")["seed"] != 2  # the base is untouched
    big = cli.expand_sweeps(wf, ["3.seed=1..100", "3.steps=1..100"])  # 10000: allowed, nothing built yet
    assert len(big) == 10000 and big[9999].inputs("3")["seed"] == 100
    with pytest.raises(cli.UsageError, match="18446744073709551616 values"):
        cli.expand_sweeps(wf, ["3.seed=0..18446744073709551615"])


def test_run_refuses_an_oversized_sweep_before_starting_a_worker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", str(TXT2IMG), "--models-dir", str(tmp_path), "--sweep", "3.seed=1..1000",
                     "--sweep", "3.steps=1..1000"])
    assert code == cli.EXIT_INVALID
    assert "1000000 jobs" in capsys.readouterr().err


# -- item 12 in the app ----------------------------------------------------------------------------------------
async def test_the_app_shows_names_from_disk_and_workflows_escaped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from textual.widgets import Select

    from tests.fakes import FakeClient
    from tui_diffusion.app import TuiDiffusionApp
    from tui_diffusion.settings import DevicePolicy, WorkerConfig
    from tui_diffusion.widgets.node_tree import NodeTree
    from tui_diffusion.widgets.param_form import Field, ParamForm

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / ESC_NAME).write_bytes(b"x")
    data = txt2img(**{"4.ckpt_name": ESC_NAME})
    data["3"]["_meta"] = {"title": "K\x1b]0;PWN\x07"}
    data["12\x1b[2J"] = {"class_type": "Evil\x1b[31m", "inputs": {}}
    (tmp_path / "wf.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    config = WorkerConfig(models_dir=tmp_path / "models", output_dir=tmp_path / "output", device=DevicePolicy("cpu"))
    app = TuiDiffusionApp(tmp_path / "wf.json", config, client_factory=FakeClient)
    async with app.run_test(size=(160, 48)) as pilot:
        for _ in range(3):
            await pilot.pause(0.05)
        labels = [str(n.label) for n in app.screen.query_one(NodeTree).root.children]
        assert labels and not any("\x1b" in label for label in labels)
        assert any("K\\x1b]0;PWN\\x07" in label for label in labels)
        assert any("Evil\\x1b[31m" in label for label in labels)
        screen = app.screen
        await screen.query_one(ParamForm).show_node(screen.document, "4", screen.models, [])
        await pilot.pause(0.05)
        select = next(f for f in screen.query(Field) if f.input_name == "ckpt_name").query_one(Select)
        prompts = [str(p) for p, v in select._options if v == ESC_NAME]
        assert prompts == ["a\\x1b]0;PWN\\x07b.safetensors"] and select.value == ESC_NAME
        app.notify(f"cannot open {ESC_NAME}", title="a\x07")
        await pilot.pause(0.05)
        shown = [(n.message, n.title) for n in app._notifications]
        assert shown[-1] == ("cannot open a\\x1b]0;PWN\\x07b.safetensors", "a\\x07")

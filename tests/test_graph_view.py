"""The graph view: the pure layout (columns, routes that never run into each other), its rasterisation,
and the widget and screen driven with the Pilot (moving the selection, panning, enter and escape)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.app import App

from tui_diffusion.graph.layout import GraphLayout, LinkRoute, layout_graph, nearest, node_columns
from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.screens.graph import GraphScreen
from tui_diffusion.widgets.graph_view import GraphCanvas, GraphView, truncate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
DATA = Path(__file__).parent / "data"


def big_workflow() -> Workflow:
    """A realistic 40-node workflow: two checkpoints with LoRA chains, three KSamplers (base, hires fix,
    img2img) and a fourth on a second model, latent and image upscales, several saves and previews."""
    nodes: dict[str, dict] = {}

    def add(node_id: int, class_type: str, title: str | None = None, **inputs: object) -> None:
        nodes[str(node_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}

    def ref(node_id: int, index: int = 0) -> list:
        return [str(node_id), index]

    sampler = {"sampler_name": "euler", "scheduler": "normal", "cfg": 7.0}
    add(1, "CheckpointLoaderSimple", "Load Checkpoint (base)", ckpt_name="base.safetensors")
    for i, nid in enumerate(range(2, 6)):
        add(nid, "LoraLoader", f"LoRA {i + 1}: detail tweaker with a long name", model=ref(nid - 1),
            clip=ref(nid - 1, 1), lora_name=f"lora{i}.safetensors", strength_model=0.8, strength_clip=0.8)
    add(6, "CLIPSetLastLayer", clip=ref(5, 1), stop_at_clip_layer=-2)
    add(7, "CLIPTextEncode", "Positive prompt — a castle on a hill at dawn, volumetric light", text="castle",
        clip=ref(6))
    add(8, "CLIPTextEncode", "Negative prompt", text="blurry", clip=ref(6))
    add(9, "EmptyLatentImage", width=512, height=768, batch_size=1)
    add(10, "KSampler", "KSampler (base)", model=ref(5), seed=1, steps=20, positive=ref(7), negative=ref(8),
        latent_image=ref(9), denoise=1.0, **sampler)
    add(11, "VAEDecode", samples=ref(10), vae=ref(1, 2))
    add(12, "SaveImage", "Save base", images=ref(11), filename_prefix="base")
    add(13, "LatentUpscaleBy", "Hires upscale latent", samples=ref(10), upscale_method="nearest-exact", scale_by=1.5)
    add(14, "KSampler", "KSampler (hires fix)", model=ref(5), seed=1, steps=12, positive=ref(7), negative=ref(8),
        latent_image=ref(13), denoise=0.5, **sampler)
    add(15, "VAEDecode", samples=ref(14), vae=ref(19))
    add(16, "SaveImage", "Save hires", images=ref(15), filename_prefix="hires")
    add(17, "ImageScaleBy", "Upscale x2", image=ref(15), upscale_method="lanczos", scale_by=2.0)
    add(18, "SaveImage", "Save upscaled", images=ref(17), filename_prefix="up")
    add(19, "VAELoader", vae_name="vae.safetensors")
    add(20, "PreviewImage", images=ref(11))
    add(21, "CheckpointLoaderSimple", "Load Checkpoint (style)", ckpt_name="style.safetensors")
    add(22, "LoraLoader", "LoRA style A", model=ref(21), clip=ref(21, 1), lora_name="a.safetensors",
        strength_model=1.0, strength_clip=1.0)
    add(23, "LoraLoader", "LoRA style B", model=ref(22), clip=ref(22, 1), lora_name="b.safetensors",
        strength_model=1.0, strength_clip=1.0)
    add(24, "CLIPTextEncode", "Style positive", text="oil painting", clip=ref(23, 1))
    add(25, "CLIPTextEncode", "Style negative", text="photo", clip=ref(23, 1))
    add(26, "EmptyLatentImage", "Latent 768", width=768, height=768, batch_size=2)
    add(27, "KSampler", "KSampler (style)", model=ref(23), seed=2, steps=25, positive=ref(37), negative=ref(25),
        latent_image=ref(26), denoise=1.0, **sampler)
    add(28, "VAEDecode", samples=ref(27), vae=ref(19))
    add(29, "ImageScale", image=ref(28), upscale_method="bilinear", width=1024, height=1024, crop="disabled")
    add(30, "SaveImage", "Save style", images=ref(29), filename_prefix="style")
    add(31, "LoadImage", image="input.png")
    add(32, "VAEEncode", pixels=ref(31), vae=ref(1, 2))
    add(33, "KSampler", "KSampler (img2img)", model=ref(38), seed=3, steps=20, positive=ref(7), negative=ref(8),
        latent_image=ref(32), denoise=0.6, **sampler)
    add(34, "VAEDecode", samples=ref(33), vae=ref(1, 2))
    add(35, "SaveImage", "Save img2img", images=ref(34), filename_prefix="i2i")
    add(36, "ConditioningSetTimestepRange", conditioning=ref(7), start=0.0, end=0.5)
    add(37, "ConditioningCombine", conditioning_1=ref(24), conditioning_2=ref(36))
    add(38, "LoraLoaderModelOnly", "LoRA (model only)", model=ref(5), lora_name="m.safetensors", strength_model=0.5)
    add(39, "LatentUpscale", samples=ref(33), upscale_method="nearest-exact", width=1024, height=1024,
        crop="disabled")
    add(40, "PreviewImage", "Preview img2img", images=ref(34))
    return Workflow.from_data(nodes)


def random_workflow(rng: random.Random, size: int) -> Workflow:
    """A random valid-shaped DAG of known node types: each socket linked to an earlier compatible output."""
    specs = list(NODE_SPECS.values())
    nodes: dict[str, dict] = {}
    for i in range(1, size + 1):
        spec = rng.choice(specs)
        inputs = {}
        for ispec in spec.inputs:
            if ispec.is_widget:
                continue
            choices = [(j, k) for j in range(1, i)
                       for k, out in enumerate(NODE_SPECS[nodes[str(j)]["class_type"]].outputs)
                       if out.type == ispec.type]
            if choices and rng.random() < 0.9:
                j, k = rng.choice(choices)
                inputs[ispec.name] = [str(j), k]
        nodes[str(i)] = {"class_type": spec.class_type, "inputs": inputs}
    return Workflow.from_data(nodes)


def seeded_workflow(seed: int) -> Workflow:
    rng = random.Random(seed)
    return random_workflow(rng, rng.randint(2, 45))


# -- geometry checks shared by the layout tests ------------------------------------------------------------------
U, D, L, R = 1, 2, 4, 8


def route_cells(link: LinkRoute) -> dict[tuple[int, int], int]:
    """The cells a route covers with the directions it leaves each one by (up, down, left, right bits)."""
    out: dict[tuple[int, int], int] = {}
    for (x0, y0), (x1, y1) in zip(link.points, link.points[1:], strict=False):
        assert x0 == x1 or y0 == y1, f"a diagonal piece in {link}"
        if y0 == y1:
            step = 1 if x1 > x0 else -1
            for x in range(x0, x1 + step, step):
                mask = (R if x != x1 else 0) | (L if x != x0 else 0) if step > 0 else \
                    (L if x != x1 else 0) | (R if x != x0 else 0)
                out[(x, y0)] = out.get((x, y0), 0) | mask
        else:
            step = 1 if y1 > y0 else -1
            for y in range(y0, y1 + step, step):
                mask = (D if y != y1 else 0) | (U if y != y0 else 0) if step > 0 else \
                    (U if y != y1 else 0) | (D if y != y0 else 0)
                out[(x0, y)] = out.get((x0, y), 0) | mask
    out[link.points[0]] = out.get(link.points[0], 0) | L
    out[link.points[-1]] = out.get(link.points[-1], 0) | R
    return out


def assert_clean(layout: GraphLayout) -> None:
    """Boxes apart; routes from port to port, outside every box; two different outputs' lines share a cell only
    where one runs straight across the other (a crossing), never along it or at a corner."""
    boxes = list(layout.boxes.values())
    for i, a in enumerate(boxes):
        assert 0 <= a.x and a.x + a.width <= layout.width and 0 <= a.y and a.y + a.height <= layout.height
        for b in boxes[i + 1:]:
            apart = a.x + a.width <= b.x or b.x + b.width <= a.x or a.y + a.height <= b.y or b.y + b.height <= a.y
            assert apart, f"boxes {a.node_id} and {b.node_id} overlap"
    by_cell: dict[tuple[int, int], dict[tuple[str, int], int]] = {}
    for link in layout.links:
        source, target = layout.boxes[link.source], layout.boxes[link.target]
        assert link.points[0] == (source.x + source.width, source.output_row(link.output_index))
        assert link.points[-1] == (target.x - 1, target.input_row(link.input_name))
        for cell, mask in route_cells(link).items():
            nets = by_cell.setdefault(cell, {})
            nets[(link.source, link.output_index)] = nets.get((link.source, link.output_index), 0) | mask
    for (x, y), nets in by_cell.items():
        assert not any(b.contains(x, y) for b in boxes), f"a line runs through a box at {(x, y)}"
        if len(nets) > 1:
            assert sorted(nets.values()) == [U | D, L | R], f"lines of {sorted(nets)} meet at {(x, y)}"


# -- the layout ------------------------------------------------------------------------------------------------------
def test_columns_follow_comfyui_reading_order() -> None:
    wf = big_workflow()
    col = node_columns(wf)
    for node_id in wf:
        sources = [link.node_id for link in wf.links(node_id).values()]
        assert col[node_id] == 1 + max((col[s] for s in sources), default=-1)
    assert [col[n] for n in ("1", "2", "5", "6", "7", "10", "13", "14")] == [0, 1, 4, 5, 6, 7, 8, 9]
    layout = layout_graph(wf)
    for column, ids in enumerate(layout.columns):
        assert {layout.boxes[n].column for n in ids} <= {column}
        assert len({layout.boxes[n].x for n in ids}) <= 1
    xs = [layout.boxes[ids[0]].x for ids in layout.columns if ids]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_a_40_node_workflow_is_laid_out_cleanly_and_fast() -> None:
    wf = big_workflow()
    assert len(wf.nodes) == 40
    start = time.perf_counter()
    layout = layout_graph(wf)
    GraphCanvas(layout)
    assert time.perf_counter() - start < 1.0  # about 30 ms here; generous for a loaded machine
    assert layout.skipped == ()
    assert len(layout.links) == sum(len(wf.links(n)) for n in wf)
    assert_clean(layout)
    # every box tall enough for one row per linked input and per used output
    ks = layout.boxes["10"]
    assert ks.inputs == ("model", "positive", "negative", "latent_image") and ks.height == 6
    assert layout.boxes["1"].outputs == (0, 1, 2)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_workflows_lay_out_cleanly(path: Path) -> None:
    wf = Workflow.load(path)
    layout = layout_graph(wf)
    assert set(layout.boxes) == set(wf.nodes)
    assert layout.skipped == ()
    assert_clean(layout)


def test_a_comfyui_ui_file_lays_out_cleanly() -> None:
    wf = Workflow.load(DATA / "sdxl-primitive-reroute.ui.json")
    layout = layout_graph(wf)
    assert set(layout.boxes) == set(wf.nodes)
    assert_clean(layout)


def test_random_graphs_route_without_lines_running_together() -> None:
    for seed in range(120):
        assert_clean(layout_graph(seeded_workflow(seed)))


def test_two_outputs_that_swap_rows_are_untangled() -> None:
    """A case the random graphs found: two outputs, each leaving a gap on the row where the other arrives. No
    choice of lanes keeps both pairs of stubs apart; the layout shifts the next column instead."""
    assert_clean(layout_graph(seeded_workflow(82)))


def test_cycles_and_missing_sources_are_skipped_not_fatal() -> None:
    wf = Workflow.from_data({
        "1": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["9", 0]}},
        "2": {"class_type": "KSampler", "inputs": {"latent_image": ["3", 0]}},
        "3": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["2", 0]}},
    })
    layout = layout_graph(wf)
    assert set(layout.boxes) == {"1", "2", "3"}
    assert ("1", "vae") in layout.skipped  # node 9 does not exist
    assert len(layout.skipped) == 2  # and one link of the 2 -> 3 -> 2 cycle
    assert_clean(layout)


def test_empty_workflow_and_unknown_node_types() -> None:
    empty = layout_graph(Workflow({}))
    assert empty.boxes == {} and empty.width == 0 and empty.height == 0
    GraphCanvas(empty)
    wf = Workflow.from_data({"1": {"class_type": "SomePluginNode", "inputs": {"x": 1}},
                             "2": {"class_type": "OtherPlugin", "inputs": {"in": ["1", 3]}}})
    layout = layout_graph(wf)
    assert layout.boxes["1"].outputs == (3,) and layout.links[0].type == "*"
    assert_clean(layout)


def test_layout_is_deterministic() -> None:
    assert layout_graph(big_workflow()) == layout_graph(big_workflow())


def test_arrows_go_to_the_nearest_node_that_way() -> None:
    layout = layout_graph(big_workflow())
    ks = layout.boxes["10"]
    right = nearest(layout, "10", "right")
    assert right is not None and layout.boxes[right].column == ks.column + 1
    left = nearest(layout, "10", "left")
    assert left is not None and layout.boxes[left].column == ks.column - 1
    same_column = layout.columns[ks.column]
    for direction in ("up", "down"):
        found = nearest(layout, "10", direction)
        if found is not None:
            assert layout.boxes[found].column == ks.column
            assert (layout.boxes[found].y < ks.y) == (direction == "up")
    top = min(layout.boxes.values(), key=lambda b: b.y)
    assert nearest(layout, top.node_id, "up") is None
    above = nearest(layout, same_column[0], "up")  # from the top of a column: on to the nearest node above
    assert above is None or layout.boxes[above].y < layout.boxes[same_column[0]].y
    assert nearest(layout, layout.columns[0][0], "left") is None
    assert nearest(layout, "missing", "left") is None


def test_layout_imports_no_textual_and_no_torch() -> None:
    code = ("import sys, tui_diffusion.graph.layout\n"
            "print(','.join(m for m in ('torch', 'textual', 'rich') if m in sys.modules))\n"
            "import tui_diffusion.screens.graph\n"
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["", ""]


# -- the canvas --------------------------------------------------------------------------------------------------------
def test_truncate_marks_cut_text_with_an_ellipsis() -> None:
    assert truncate("KSampler", 10) == list("KSampler")
    assert "".join(truncate("Positive prompt — a castle", 10)) == "Positive …"
    cells = truncate("城堡城堡城堡", 6)  # wide characters: two cells each, never half of one
    assert len(cells) == 6 and "".join(cells) == "城堡 …"
    assert truncate("a\nb", 5) == ["a", " ", "b"]


def test_boxes_show_id_title_and_class_and_highlights() -> None:
    layout = layout_graph(big_workflow())
    canvas = GraphCanvas(layout)
    box = layout.boxes["7"]
    rows = canvas.text().split("\n")

    def cells(y: int) -> str:
        return rows[y][box.x:box.x + box.width]

    assert cells(box.y).startswith("╭─ 7 ─") and cells(box.y).endswith("╮")
    assert cells(box.y + 1) == "┤Positive prompt — a…├"  # linked input and output ports on the borders
    assert cells(box.y + 2) == "│CLIPTextEncode      │"
    assert canvas.key(box.x + 1, box.y + 1) == ("box", "7", "title")
    canvas.draw_box("7", selected=True, running=True)
    rows = canvas.text().split("\n")
    assert cells(box.y)[0] == "┏" and cells(box.y + 1)[0] == "┨"
    assert "running" in cells(box.y + box.height - 1)
    canvas.draw_box("7")
    assert canvas.text().split("\n")[box.y][box.x] == "╭"


def test_lines_cross_with_a_crossing_character() -> None:
    canvas = GraphCanvas(layout_graph(big_workflow()))
    text = canvas.text()
    assert "┼" in text
    for y, row in enumerate(text.split("\n")):
        for x, char in enumerate(row):
            if char == "┼":
                key = canvas.key(x, y)
                assert key[0] == "link" and len(key[1]) == 2  # the lines of two different outputs


# -- the widget and the screen ----------------------------------------------------------------------------------------
class GraphApp(App):
    """A bare app that opens the graph screen and keeps what it was dismissed with."""

    def __init__(self, workflow: Workflow, selected: str | None = None, running: object = None) -> None:
        super().__init__()
        self.workflow, self.selected, self.running = workflow, selected, running
        self.results: list[str | None] = []

    def on_mount(self) -> None:
        self.push_screen(GraphScreen(self.workflow, self.selected, self.running), self.results.append)


def visible(view: GraphView, node_id: str) -> bool:
    box = view.canvas.layout.boxes[node_id]
    x, y = int(view.scroll_x), int(view.scroll_y)
    width, height = view.scrollable_content_region.size
    return x <= box.x and box.x + box.width <= x + width and y <= box.y and box.y + box.height <= y + height


async def test_enter_returns_the_selected_node() -> None:
    app = GraphApp(big_workflow(), "10")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        assert view.selected == "10" and visible(view, "10")
        await pilot.press("right")
        assert view.selected == nearest(view.canvas.layout, "10", "right")
        info = str(app.screen.query_one("#graph-info").render())
        assert view.selected is not None and view.canvas.layout.boxes[view.selected].title in info
        await pilot.press("left")
        assert view.canvas.layout.boxes[view.selected].column == 7
        await pilot.press("enter")
        await pilot.pause()
    assert app.results == [view.selected]


@pytest.mark.parametrize("key", ["escape", "f5"])
async def test_escape_or_the_opening_key_returns_nothing(key: str) -> None:
    app = GraphApp(big_workflow(), "10")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("down", key)
        await pilot.pause()
    assert app.results == [None]


async def test_small_terminal_pans_to_follow_the_selection() -> None:
    app = GraphApp(big_workflow(), "1")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        assert view.virtual_size.width > view.size.width
        start = view.scroll_x
        for _ in range(9):
            await pilot.press("right")
            assert visible(view, view.selected), view.selected
        assert view.scroll_x > start + 100
        column = view.canvas.layout.boxes[view.selected].column
        assert column >= 8
        for _ in range(6):
            await pilot.press("down")
            assert visible(view, view.selected)
        x, y = view.scroll_x, view.scroll_y
        await pilot.press("shift+left")
        assert view.scroll_x < x and view.scroll_y == y


async def test_only_the_visible_part_is_rendered() -> None:
    app = GraphApp(big_workflow(), "1")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        width = view.scrollable_content_region.width
        lines = [view.render_line(y) for y in range(view.scrollable_content_region.height)]
        assert all(strip.cell_length == width for strip in lines)
        text = "\n".join(strip.text for strip in lines)
        assert "Load Checkpoint (ba…" in text
        assert "Save upscaled" not in text  # far right: not drawn until panned to


async def test_running_node_is_highlighted_and_followed() -> None:
    running = {"node": "14"}
    app = GraphApp(big_workflow(), "1", lambda: running["node"])
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        assert view.running == "14"
        box = view.canvas.layout.boxes["14"]
        assert "running" in "".join(view.canvas.chars[box.y + box.height - 1][box.x:box.x + box.width])
        running["node"] = "15"
        await pilot.pause(0.4)
        assert view.running == "15"
        assert "running" not in "".join(view.canvas.chars[box.y + box.height - 1][box.x:box.x + box.width])
        await pilot.press("r")
        assert view.selected == "15"


async def test_clicking_a_box_selects_it_and_a_double_click_opens_it() -> None:
    app = GraphApp(Workflow.load(ROOT / "workflows" / "txt2img.json"), "3")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        box = view.canvas.layout.boxes["4"]
        offset = (box.x + 3 - int(view.scroll_x), box.y + 1 - int(view.scroll_y))
        await pilot.click(GraphView, offset=offset)
        assert view.selected == "4"
        await pilot.click(GraphView, offset=offset, times=2)
        await pilot.pause()
    assert app.results == ["4"]


async def test_an_empty_workflow_shows_an_empty_graph() -> None:
    app = GraphApp(Workflow({}))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        assert view.selected is None and view.virtual_size.width == 0
        assert "empty workflow" in str(app.screen.query_one("#graph-info").render())
        await pilot.press("right", "enter", "escape")
        await pilot.pause()
    assert app.results == [None]


# -- from the main screen --------------------------------------------------------------------------------------------
@pytest.fixture()
def main_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    import json
    import shutil

    from tests.conftest import TINY, TXT2IMG
    from tests.fakes import FakeClient
    from tui_diffusion.app import TuiDiffusionApp
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / TINY).write_bytes(b"x")
    shutil.copytree(TXT2IMG.parent, tmp_path / "workflows")
    wf = json.loads((TXT2IMG.parent / "hires-fix.json").read_text())
    wf["4"]["inputs"]["ckpt_name"] = TINY
    (tmp_path / "workflows" / "mine.json").write_text(json.dumps(wf))
    monkeypatch.chdir(tmp_path)
    config = WorkerConfig(models_dir=tmp_path / "models", output_dir=tmp_path / "output", device=DevicePolicy("cpu"))
    return TuiDiffusionApp(Path("workflows/mine.json"), config, client_factory=FakeClient)


async def test_f5_opens_the_graph_and_enter_selects_the_node_in_the_editor(main_app) -> None:
    from tui_diffusion.widgets.node_tree import NodeTree
    from tui_diffusion.widgets.param_form import ParamForm

    async with main_app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        main = main_app.main_screen
        assert main.selected_node == "3"
        await pilot.press("f5")
        await pilot.pause()
        assert isinstance(main_app.screen, GraphScreen)
        view = main_app.screen.query_one(GraphView)
        assert view.selected == "3"
        await pilot.press("right")  # the latent upscale after the first KSampler
        chosen = view.selected
        assert chosen == "10"
        await pilot.press("enter")
        for _ in range(3):
            await pilot.pause()
        assert main_app.screen is main
        assert main.selected_node == chosen
        assert main.query_one(ParamForm).node_id == chosen
        assert main.query_one(NodeTree).selected_node_id() == chosen
        await pilot.press("f5")
        await pilot.pause()
        await pilot.press("down", "f5")  # the same key closes it, selection unchanged
        await pilot.pause()
        assert main_app.screen is main and main.selected_node == chosen


def test_the_graph_is_in_the_command_palette(main_app) -> None:
    from tui_diffusion.screens.main import MainScreen

    main_app.main_screen = MainScreen(main_app.document)
    titles = [command.title for command in main_app.get_system_commands(main_app.main_screen)]
    assert "Graph" in titles


async def test_a_storm_of_keys_never_breaks_the_graph_screen() -> None:
    """Random keys at speed, the screen closed and opened again whenever a key closes it: no exception, and the
    selection is always a node of the workflow, in view."""
    rng = random.Random(13)
    keys = ["up", "down", "left", "right", "shift+up", "shift+down", "shift+left", "shift+right", "enter",
            "escape", "f5", "r", "tab", "shift+tab", "pageup", "pagedown", "home", "end", "x", "space"]
    workflow = big_workflow()

    class Reopening(GraphApp):
        def reopen(self, result: str | None) -> None:
            self.results.append(result)
            self.push_screen(GraphScreen(workflow, result or "1", "14"), self.reopen)

        def on_mount(self) -> None:
            self.push_screen(GraphScreen(workflow, "1", "14"), self.reopen)

    app = Reopening(workflow)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(60):
            await pilot.press(rng.choice(keys))
        await pilot.pause()
        view = app.screen.query_one(GraphView)
        assert view.selected in workflow.nodes
    assert app.results and all(r is None or r in workflow.nodes for r in app.results)

"""Follow-ups to the terminal app's rework, driven with Pilot: outputs the image pane cannot draw, names with
control characters, the exit code after a crash, flattened subgraph files, and the help screen's keys."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from tests.fakes import FakeClient
from tests.test_tui import home as home  # noqa: F401  (a fixture)
from tests.test_tui import make_app, settle
from tui_diffusion import messages as m
from tui_diffusion.app import TuiDiffusionApp, run_tui
from tui_diffusion.settings import DevicePolicy, WorkerConfig
from tui_diffusion.widgets.image_pane import ImagePane

DATA = Path(__file__).parent / "data"
ESC_NAME = "a\x1b]0;PWN\x07b"  # a name that would retitle the terminal if printed raw


def bomb_png(path: Path, side: int = 60000) -> Path:
    """A PNG whose header claims side x side 1-bit pixels: a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def finish_with(fake: FakeClient, job_id: str, outputs: list[Path]) -> None:
    fake.emit(m.JobStarted(job_id), m.JobFinished(job_id, [str(p) for p in outputs], ["9"], [], {"9": 0.01}, 0.1))


def pane_text(pane: ImagePane) -> str:
    return str(pane.caption)


# -- 1. outputs the pane cannot draw --------------------------------------------------------------------------
async def test_a_latent_a_deleted_file_or_a_bomb_is_a_message_in_the_pane_not_a_crash(home: Path) -> None:
    from PIL import Image

    out = home / "output"
    out.mkdir()
    latent = out / "x_00001_.latent"
    latent.write_bytes(b"not an image at all")
    gone = out / "gone_00001_.png"
    bomb = bomb_png(out / "bomb_00001_.png")
    image = out / "ok_00001_.png"
    Image.new("RGB", (16, 16), (0, 200, 0)).save(image)
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        pane = app.screen.query_one(ImagePane)
        fake = FakeClient.instances[-1]

        async def run(outputs: list[Path]) -> None:
            await pilot.press("ctrl+r")
            await settle(pilot)
            finish_with(fake, fake.submitted[-1][0], outputs)
            await settle(pilot, 6)

        await run([latent])  # SaveLatent only
        assert pane.image is None and "no image to show" in pane_text(pane) and latent.name in pane_text(pane)
        await run([image, latent])  # an image and a latent: the image is shown, the latent skipped
        assert pane.image is not None and pane.path == image
        await run([gone])
        assert pane.image is None and pane.path is None and "no longer exists" in pane_text(pane)
        await run([bomb])
        assert pane.image is None and "cannot show bomb_00001_.png" in pane_text(pane)
        assert "pixels" in pane_text(pane)
        await pilot.press("v")  # nothing to view full-size: said, not attempted
        await settle(pilot)
        assert type(app.screen).__name__ == "MainScreen" and app.is_running


async def test_history_shows_a_message_for_a_bomb_and_skips_latents(home: Path) -> None:
    from tui_diffusion.store.history import History

    db = home / "h.sqlite3"
    history = History(db)
    out = home / "output"
    out.mkdir()
    latent = out / "x_00001_.latent"
    latent.write_bytes(b"latent bytes")
    bomb = bomb_png(out / "bomb_00001_.png")
    wf = json.loads((home / "workflows" / "mine.json").read_text())
    history.job_started("a", wf, {}, "a latent only", "cpu (CPU)")
    history.job_finished("a", "ok", outputs=[str(latent)], seconds=1.0)
    history.job_started("b", wf, {}, "a bomb", "cpu (CPU)")
    history.job_finished("b", "ok", outputs=[str(bomb)], seconds=1.0)
    config = WorkerConfig(models_dir=home / "models", output_dir=out, device=DevicePolicy("cpu"), db_path=db)
    app = TuiDiffusionApp(Path("workflows/mine.json"), config, client_factory=FakeClient)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("f4")
        await settle(pilot)
        screen = app.screen
        screen.query_one("#jobs").focus()
        pane = screen.query_one(ImagePane)
        seen = set()
        for _ in range(2):
            await settle(pilot)
            row = screen.selected()
            seen.add(row.id)
            if row.id == "a":
                assert pane.image is None and pane_text(pane) == "no image"  # the latent is not tried
            else:
                assert pane.image is None and "cannot show bomb_00001_.png" in pane_text(pane)
            await pilot.press("down")
        assert seen == {"a", "b"} and app.is_running


# -- 2. names with control characters ------------------------------------------------------------------------
async def test_history_escapes_errors_and_prompts(home: Path) -> None:
    from textual.widgets import DataTable, Static

    from tui_diffusion.store.history import History

    db = home / "h.sqlite3"
    history = History(db)
    wf = json.loads((home / "workflows" / "mine.json").read_text())
    history.job_started("a", wf, {}, f"prompt {ESC_NAME}", "cpu (CPU)")
    history.job_finished("a", "error", error=f"node 4: {ESC_NAME}.safetensors not found [bold]x[/bold]")
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", device=DevicePolicy("cpu"),
                          db_path=db)
    app = TuiDiffusionApp(Path("workflows/mine.json"), config, client_factory=FakeClient)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("f4")
        await settle(pilot)
        screen = app.screen
        screen.query_one("#jobs").focus()
        await settle(pilot)
        details = screen.query_one("#details", Static).render()
        shown = str(details)
        assert "\x1b" not in shown and "\x07" not in shown
        assert "a\\x1b]0;PWN\\x07b.safetensors" in shown and "[bold]x[/bold]" in shown  # not read as markup
        table = screen.query_one("#jobs", DataTable)
        prompt = str(table.get_row_at(0)[3])
        assert "\x1b" not in prompt and "prompt a\\x1b]0;PWN\\x07b" in prompt


async def test_the_open_dialog_lists_file_names_escaped(home: Path) -> None:
    from textual.widgets import OptionList

    shutil.copy(home / "workflows" / "mine.json", home / "workflows" / f"{ESC_NAME}.json")
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+o")
        await settle(pilot)
        options = app.screen.query_one(OptionList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        odd = [p for p in prompts if "PWN" in p]
        assert odd and all("\x1b" not in p and "\x07" not in p for p in prompts)
        assert odd[0].endswith("a\\x1b]0;PWN\\x07b.json")
        await pilot.press("down")  # from the path field into the list
        await settle(pilot)
        assert app.focused is options


async def test_the_graph_screen_escapes_titles_and_types(home: Path) -> None:
    from textual.widgets import Static

    from tui_diffusion.widgets.graph_view import truncate

    wf = json.loads((home / "workflows" / "mine.json").read_text())
    wf["3"]["_meta"] = {"title": f"Sampler {ESC_NAME}"}
    (home / "workflows" / "odd.json").write_text(json.dumps(wf))
    app = make_app(home, "workflows/odd.json")
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.screen.selected_node = "3"
        await pilot.press("f5")
        await settle(pilot)
        screen = app.screen
        assert type(screen).__name__ == "GraphScreen"
        info = str(screen.query_one("#graph-info", Static).render())
        assert "Sampler a\\x1b]0;PWN\\x07b" in info and "\x1b" not in info and "\x07" not in info
        box = "".join(truncate(f"Sampler {ESC_NAME}", 40))  # the title as the box draws it
        assert box == "Sampler a\\x1b]0;PWN\\x07b"


# -- 3. the exit code after a crash ---------------------------------------------------------------------------
def _run_headless(monkeypatch: pytest.MonkeyPatch, home: Path, first_frame) -> int:  # noqa: ANN001
    """run_tui as the CLI calls it, the app headless and ``first_frame`` run once it is up."""
    from textual.app import App

    monkeypatch.setattr(TuiDiffusionApp, "run", lambda self: App.run(self, headless=True))
    original = TuiDiffusionApp._first_frame

    def patched(self: TuiDiffusionApp) -> None:
        original(self)
        self.call_later(first_frame, self)

    monkeypatch.setattr(TuiDiffusionApp, "_first_frame", patched)
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", device=DevicePolicy("cpu"))
    return run_tui(Path("workflows/mine.json"), config, client_factory=FakeClient)


def test_run_tui_exits_non_zero_after_a_ui_crash(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def crash(app: TuiDiffusionApp) -> None:
        raise KeyError("No 'text-area--gutter' key in COMPONENT_CLASSES")

    assert _run_headless(monkeypatch, home, crash) == 1
    told = capsys.readouterr()
    assert "internal error" in told.out + told.err


def test_run_tui_keeps_the_hang_up_code_and_exits_zero_on_quit(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_headless(monkeypatch, home, lambda app: app.hang_up()) == 129
    assert _run_headless(monkeypatch, home, lambda app: app.exit()) == 0


# -- 4. a UI file with subgraphs opens as untitled -------------------------------------------------------------
async def test_a_file_with_subgraphs_opens_untitled_and_says_saving_writes_a_new_file(home: Path) -> None:
    source = home / "workflows" / "with_subgraph.json"
    shutil.copy(DATA / "templates" / "flux_fill_inpaint_example.json", source)
    before = source.read_bytes()
    app = make_app(home, str(source.relative_to(home)))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        doc = app.screen.document
        assert doc.path is None and app.title.startswith("untitled.json")
        told = [n.message for n in app._notifications]
        assert sum("subgraphs or group nodes" in t and "saving writes a new file" in t for t in told) == 1
        await pilot.press("ctrl+s")  # no file name: save as asks for one, the user's file is not touched
        await settle(pilot)
        assert type(app.screen).__name__ == "PromptDialog"
        await pilot.press("escape")
        await settle(pilot)
        # opened again from the editor (ctrl+o): said again, still untitled
        await app.screen.load(source)
        await settle(pilot)
        assert app.screen.document.path is None
        told = [n.message for n in app._notifications]
        assert sum("subgraphs or group nodes" in t for t in told) == 2
    assert source.read_bytes() == before


async def test_a_ui_file_without_subgraphs_keeps_its_path(home: Path) -> None:
    source = home / "workflows" / "big.json"
    shutil.copy(DATA / "sdxl-40-nodes.ui.json", source)
    app = make_app(home, str(source.relative_to(home)))
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert app.screen.document.path == Path(str(source.relative_to(home)))
        assert not any("subgraphs" in n.message for n in app._notifications)


# -- 5. the help screen --------------------------------------------------------------------------------------
async def test_the_help_screen_lists_the_graph_view_and_the_new_keys(home: Path) -> None:
    from textual.widgets import Markdown

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("f1")
        await settle(pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        source = app.screen.query_one(Markdown).source
        for key in ("`f5`", "graph view", "`/` or `ctrl+f`", "`g`", "`b` comes back", "`right`/`left`", "`f2`",
                    "`ctrl+a` select all", "`ctrl+c`/`ctrl+x`/`ctrl+v`", "move by words", "tokens"):
            assert key in source, key



async def test_the_image_follows_each_new_job_not_only_the_first(home: Path) -> None:
    """Laying the queue's rows out again for a new job moved its cursor: that was taken for the user choosing
    an older job, and the pane stopped following the latest one."""
    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        pane = app.screen.query_one(ImagePane)
        fake = FakeClient.instances[-1]
        for _ in range(3):
            await pilot.press("ctrl+r")
            await settle(pilot)
            image = fake.run_job(fake.submitted[-1][0], home / "out")
            await settle(pilot, 6)
            assert pane.path == image


async def test_a_long_token_count_line_ends_in_an_ellipsis_at_100_columns(home: Path) -> None:
    """The count is one line high: cut with "…" rather than wrapped onto a line nobody sees."""
    from tui_diffusion.widgets.node_tree import NodeTree

    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        tree.jump_to("6", "text")
        await pilot.press("enter", "ctrl+a", *"a fox embedding:night")
        await settle(pilot, 6)
        tokens = app.focused.parent.query_one(".tokens")
        assert tokens.size.width < len("4/75 tokens (an embedding counts as 1)")
        shown = tokens.render_line(0).text.rstrip()
        assert shown.startswith("3/75 tokens (an embedding") and shown.endswith("…")


async def test_at_100_columns_a_running_jobs_progress_and_a_failures_cause_are_in_sight(home: Path) -> None:
    """The job's label (a long seed) came before the progress column and pushed it out of the narrow queue pane;
    a long error did the same to the next columns."""
    from textual.widgets import DataTable

    from tui_diffusion.widgets.queue_panel import ERROR_CELL

    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        queue = app.screen.query_one("#queue", DataTable)
        fake = FakeClient.instances[-1]
        await pilot.press("ctrl+r")
        await settle(pilot)
        job = fake.submitted[-1][0]
        fake.run_job(job, home / "out", steps=4, finish=False)
        await settle(pilot, 6)
        shown = "\n".join(queue.render_line(y).text for y in range(queue.size.height))
        assert "4/4" in shown, shown
        await pilot.press("ctrl+r")
        await settle(pilot)
        second = fake.submitted[-1][0]
        fake.emit(m.JobStarted(second), m.JobFailed(second, "3", "the sampler ran out of memory " * 6 + "\nmore"))
        await settle(pilot, 6)
        shown = "\n".join(queue.render_line(y).text for y in range(queue.size.height))
        assert "failed   the sampler ran" in shown, shown  # the cause's start, beside the state
        cell = str(queue.get_cell(second, queue.ordered_columns[2].key))
        assert cell.startswith("the sampler ran out of memory") and cell.endswith("…") and "more" not in cell
        assert len(cell) == ERROR_CELL

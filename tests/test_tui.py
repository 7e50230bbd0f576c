"""The terminal app driven with Textual's Pilot, against a worker double that speaks the real protocol."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, TXT2IMG
from tests.fakes import FakeClient
from tui_diffusion.app import TuiDiffusionApp
from tui_diffusion.settings import DevicePolicy, WorkerConfig
from tui_diffusion.widgets.image_pane import ImagePane
from tui_diffusion.widgets.node_tree import NodeTree
from tui_diffusion.widgets.param_form import Field, NumberInput, ParamForm
from tui_diffusion.widgets.queue_panel import QueuePanel


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's folder: models/checkpoints with a (never loaded) tiny file name, workflows/."""
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / TINY).write_bytes(b"x")
    shutil.copytree(TXT2IMG.parent, tmp_path / "workflows")
    wf = json.loads(TXT2IMG.read_text())
    wf["4"]["inputs"]["ckpt_name"] = TINY
    (tmp_path / "workflows" / "mine.json").write_text(json.dumps(wf))
    monkeypatch.chdir(tmp_path)
    FakeClient.instances.clear()
    return tmp_path


def make_app(home: Path, workflow: str | None = "workflows/mine.json") -> TuiDiffusionApp:
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", device=DevicePolicy("cpu"))
    return TuiDiffusionApp(Path(workflow) if workflow else None, config, client_factory=FakeClient)


async def settle(pilot, times: int = 3) -> None:
    for _ in range(times):
        await pilot.pause(0.05)


def field(app: TuiDiffusionApp, name: str) -> Field:
    return next(f for f in app.screen.query(Field) if f.input_name == name)


async def test_opens_the_workflow_and_shows_worker_state(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        labels = [str(n.label) for n in tree.root.children]
        assert any("KSampler" in label for label in labels) and len(labels) == 7
        assert "ready: Fake CPU" in app.sub_title
        assert app.title == "mine.json"  # opened unchanged: not dirty
        assert app.screen.query_one(ParamForm).node_id == "3"


async def test_nudge_a_number_with_keys_and_undo(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        steps = field(app, "steps").query_one(NumberInput)
        steps.focus()
        await pilot.press("plus", "plus", "shift+up")
        await settle(pilot)
        doc = app.screen.document
        assert doc.workflow.inputs("3")["steps"] == 32 and doc.dirty and app.title.endswith("•")
        await pilot.press("ctrl+z")
        await settle(pilot)
        assert doc.workflow.inputs("3")["steps"] == 22  # each nudge is one undo step


async def test_invalid_value_is_shown_inline_and_blocks_queueing(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        cfg = field(app, "cfg").query_one(NumberInput)
        cfg.focus()
        cfg.value = ""
        await pilot.press("minus", "1")  # '-' nudges; type a bad value directly
        cfg.value = "-1"
        await settle(pilot)
        assert "below the minimum" in str(field(app, "cfg").query_one(".error").render())
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert FakeClient.instances[-1].submitted == []


async def test_missing_model_marks_the_node_and_blocks(home: Path) -> None:
    app = make_app(home, "workflows/txt2img.json")  # names a checkpoint the folder lacks
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert FakeClient.instances[-1].submitted == []
        tree = app.screen.query_one(NodeTree)
        loader = next(n for n in tree.root.children if n.data[1] == "4")
        assert str(loader.label).startswith("! ")
        assert "problem" in app.sub_title


async def test_queue_progress_preview_and_result(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        doc = app.screen.document
        doc.set_seed_mode("3", "seed", "increment")
        seed = doc.workflow.inputs("3")["seed"]
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        (job_id, sent), = fake.submitted
        assert sent["3"]["inputs"]["seed"] == seed
        assert doc.workflow.inputs("3")["seed"] == seed + 1  # control after generate
        image = fake.run_job(job_id, home / "out", finish=False)
        await settle(pilot, 6)
        record = app.screen.book.jobs[job_id]
        assert record.status == "running" and record.step == 4
        pane = app.screen.query_one(ImagePane)
        assert pane.image is not None and "preview 4/4" in pane.caption and pane.path is None
        assert "busy" in app.sub_title
        fake.finish(job_id, image)
        await settle(pilot, 6)
        assert record.status == "done" and pane.path == image
        tree = app.screen.query_one(NodeTree)
        sampler = next(n for n in tree.root.children if n.data[1] == "3")
        assert "executed 0.50s" in str(sampler.label)
        queue = app.screen.query_one(QueuePanel)
        assert queue.row_count == 1 and "done" in str(queue.get_row_at(0)[1])


async def test_interrupt_the_running_job(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        job_id = fake.submitted[0][0]
        fake.run_job(job_id, home / "out", finish=False)
        await settle(pilot, 4)
        await pilot.press("ctrl+x")
        await settle(pilot)
        assert fake.cancelled == [job_id]


async def test_queue_many_with_incrementing_seeds_and_manage_pending(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        seed = app.screen.document.workflow.inputs("3")["seed"]
        await pilot.press("ctrl+b")
        await settle(pilot)
        await pilot.press("ctrl+a", "ctrl+k", "3", "enter")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        assert [w["3"]["inputs"]["seed"] for _, w in fake.submitted] == [seed, seed + 1, seed + 2]
        queue = app.screen.query_one(QueuePanel)
        queue.focus()
        queue.move_cursor(row=2)
        await pilot.press("t")
        await settle(pilot)
        assert fake.moved == [fake.submitted[2][0]]
        assert [j.job_id for j in app.screen.book.ordered()][0] == fake.submitted[2][0]
        queue.move_cursor(row=2)
        await pilot.press("delete")
        await settle(pilot)
        assert fake.cancelled == [queue.coordinate_to_cell_key(queue.cursor_coordinate).row_key.value]


async def test_save_as_then_open_round_trip(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.screen.document.set_value("3", "steps", 7)
        await pilot.press("f3")
        await settle(pilot)
        await pilot.press("ctrl+a", "ctrl+k", *"saved.json", "enter")
        await settle(pilot)
        saved = json.loads((home / "saved.json").read_text())
        assert saved["3"]["inputs"]["steps"] == 7
        assert app.title == "saved.json"
        app.screen.document.set_value("3", "steps", 9)
        await pilot.press("ctrl+o")
        await settle(pilot)
        await pilot.press(*"saved.json", "enter")
        await settle(pilot)
        await pilot.press("tab", "enter")  # unsaved changes: "Discard" is the second button
        await settle(pilot, 5)
        assert app.screen.document.workflow.inputs("3")["steps"] == 7


async def test_add_link_delete_and_undo_a_node(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.screen.query_one(NodeTree).focus()
        await pilot.press("a")
        await settle(pilot)
        await pilot.press(*"Preview", "enter")
        await settle(pilot, 5)
        doc = app.screen.document
        assert doc.workflow.class_type("10") == "PreviewImage"
        link_button = field(app, "images").query_one(".link")
        link_button.focus()
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("enter")  # first compatible output: VAE Decode.IMAGE
        await settle(pilot, 5)
        assert doc.workflow.inputs("10")["images"] == ["8", 0]
        app.screen.query_one(NodeTree).focus()
        app.screen.query_one(NodeTree).move_cursor(app.screen.query_one(NodeTree).root.children[-1])
        await settle(pilot)
        await pilot.press("delete")
        await settle(pilot, 5)
        assert "10" not in doc.workflow
        await pilot.press("ctrl+z")
        await settle(pilot, 5)
        assert doc.workflow.inputs("10")["images"] == ["8", 0]


async def test_worker_crash_restarts_and_keeps_pending_jobs(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+r")
        await pilot.press("ctrl+r")
        await settle(pilot)
        first = FakeClient.instances[-1]
        running, pending = (j for j, _ in first.submitted)
        first.emit(__import__("tui_diffusion.messages", fromlist=["JobStarted"]).JobStarted(running))
        await settle(pilot)
        first.crash()
        await settle(pilot, 8)
        assert len(FakeClient.instances) == 2
        second = FakeClient.instances[-1]
        assert [j for j, _ in second.submitted] == [pending]
        assert app.screen.book.jobs[running].status == "failed"
        assert "crashed" in app.screen.book.jobs[running].error


async def test_small_terminal_switches_panels(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert screen.query_one("#panels").has_class("narrow")
        assert screen.query_one("#right").region.width == 0 and screen.query_one("#form").region.width > 0
        await pilot.press("f2")
        await settle(pilot)
        assert screen.query_one("#image").region.width > 0 and screen.query_one("#tree").region.width == 0


async def test_help_screen_lists_the_keys(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        app.screen.query_one(NodeTree).focus()
        await pilot.press("question_mark")
        await settle(pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await settle(pilot)
        assert type(app.screen).__name__ == "MainScreen"


async def test_quit_with_unsaved_changes_asks_first(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        app.screen.document.set_value("3", "steps", 3)
        await pilot.press("ctrl+q")
        await settle(pilot)
        assert type(app.screen).__name__ == "ConfirmDialog"
        await pilot.press("escape")
        await settle(pilot)
        assert app.is_running


async def test_opening_the_default_workflow_leaves_it_unchanged(home: Path) -> None:
    app = make_app(home, "workflows/txt2img.json")
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, 6)
        assert not app.screen.document.dirty and "•" not in app.title


async def test_keyboard_only_edit_from_the_tree(home: Path) -> None:
    """Enter on an input in the tree jumps to its field; typing edits it; escape-free round trip."""
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        sampler = next(n for n in tree.root.children if n.data[1] == "3")
        seed_leaf = next(c for c in sampler.children if c.data[2] == "seed")
        tree.move_cursor(seed_leaf)
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.focused, NumberInput) and app.focused.spec.name == "seed"
        await pilot.press("ctrl+a", "ctrl+k", *"42")  # Input: home, delete to end, type
        await settle(pilot)
        assert app.screen.document.workflow.inputs("3")["seed"] == 42


async def test_command_palette_lists_the_actions(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        names = [c.title for c in app.get_system_commands(app.screen)]
        for expected in ("Queue", "Interrupt", "Save", "Open", "Undo", "Help", "Add node"):
            assert expected in names, names


async def test_history_screen_reopens_and_deletes_jobs(home: Path) -> None:
    from PIL import Image

    from tui_diffusion.store.history import History

    db = home / "h.sqlite3"
    history = History(db)
    image = home / "output" / "old_00001_.png"
    image.parent.mkdir()
    Image.new("RGB", (32, 32), (0, 120, 200)).save(image)
    old = json.loads((home / "workflows" / "mine.json").read_text())
    old["3"]["inputs"]["seed"] = 4242
    history.job_started("a", old, {}, "a blue square", "cpu (CPU)")
    history.job_finished("a", "ok", outputs=[str(image)], seconds=1.0)
    history.job_started("b", old, {}, "a red circle", "cpu (CPU)")
    history.job_finished("b", "error", error="node 4: broken")
    config = WorkerConfig(models_dir=home / "models", output_dir=home / "output", device=DevicePolicy("cpu"),
                          db_path=db)
    app = TuiDiffusionApp(Path("workflows/mine.json"), config, client_factory=FakeClient)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("f4")
        await settle(pilot)
        screen = app.screen
        assert type(screen).__name__ == "HistoryScreen" and len(screen.rows) == 2
        screen.query_one("#filter").value = "blue"
        await settle(pilot)
        assert list(screen.rows) == ["a"]
        screen.query_one("#jobs").focus()
        await settle(pilot)
        assert screen.query_one(ImagePane).path == image
        await pilot.press("delete")
        await settle(pilot)
        await pilot.press("enter")  # "Delete" is the first button
        await settle(pilot)
        assert not image.exists() and [r.id for r in History(db).jobs()] == ["b"]
        screen.query_one("#filter").value = ""
        await settle(pilot)
        screen.query_one("#jobs").focus()
        await pilot.press("enter")
        await settle(pilot, 6)
        assert type(app.screen).__name__ == "MainScreen"
        assert app.screen.document.workflow.inputs("3")["seed"] == 4242


async def test_held_jobs_from_a_dead_worker_are_shown_resumed_or_discarded(home: Path) -> None:
    import os

    from tui_diffusion.store.history import History

    history = History(Path(os.environ["TUI_DIFFUSION_DB"]))
    wf = json.loads((home / "workflows" / "mine.json").read_text())
    for job in ("gone-1", "gone-2", "gone-3"):
        history.job_queued(job, wf, "a-session-nobody-holds")
    history.job_state("gone-1", "running")  # it was running when the machine went down
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        for _ in range(40):
            await settle(pilot)
            if app.screen.book.jobs:
                break
        book = app.screen.book
        assert [(j.job_id, j.status) for j in book.ordered()] == [("gone-1", "held"), ("gone-2", "held"),
                                                                  ("gone-3", "held")]
        assert book.jobs["gone-1"].error == "interrupted"
        await pilot.press("ctrl+t")  # the queue; the first row is gone-1
        await pilot.press("down", "down", "delete")
        await settle(pilot)
        assert book.jobs["gone-3"].status == "removed"
        assert {r.id: r.status for r in history.jobs()}["gone-3"] == "removed"
        await pilot.press("escape", "R")
        await settle(pilot)
        assert [j for j, _ in FakeClient.instances[-1].submitted] == ["gone-1", "gone-2"]
        assert book.jobs["gone-1"].status == book.jobs["gone-2"].status == "pending"


async def test_a_hang_up_keeps_unsaved_edits_in_a_recovery_file(home: Path) -> None:
    from tui_diffusion.state import load_state

    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.screen.document.set_value("3", "seed", 4242)
        assert app.screen.document.dirty
        app.hang_up()
        await settle(pilot)
    assert app.return_code == 129
    recovered = Path(load_state()["recovered"])
    assert json.loads(recovered.read_text())["3"]["inputs"]["seed"] == 4242
    assert FakeClient.instances[-1].closed  # the worker was told to go (it leaves its queue in the store)


async def test_the_queue_shows_which_worker_runs_each_job(home: Path) -> None:
    from tui_diffusion import messages as m

    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+r")
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        (first, _), (second, _) = fake.submitted
        fake.emit(m.JobPlaced(first, "worker 0 (GPU 0)"), m.JobPlaced(second, "worker 1 (GPU 1)"))
        await settle(pilot, 6)
        queue = app.screen.query_one(QueuePanel)
        labels = [str(queue.get_row_at(i)[3]) for i in range(queue.row_count)]
        assert labels[0].endswith("· worker 0 (GPU 0)") and labels[1].endswith("· worker 1 (GPU 1)")


async def test_a_worker_that_keeps_dying_is_not_restarted_forever(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+r")
        await settle(pilot)
        for _ in range(5):
            FakeClient.instances[-1].crash()
            await settle(pilot, 8)
        assert len(FakeClient.instances) == 5  # the first and four restarts; the fifth death stops it
        assert app.worker_state == "stopped"
        assert [j.status for j in app.screen.book.ordered()] == ["held"]  # R queues it after a fix


async def test_losing_the_background_server_falls_back_to_an_own_worker(home: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tui_diffusion.client
    from tui_diffusion import messages as m

    class OwnWorker(FakeClient):
        pass

    monkeypatch.setattr(tui_diffusion.client, "WorkerClient", OwnWorker)
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        server = FakeClient.instances[-1]
        theirs = json.loads((home / "workflows" / "mine.json").read_text())
        server.emit(m.Attached(None, [m.JobSummary("theirs", theirs, status="pending")], 4321))
        await settle(pilot, 6)
        assert app.attached_to == 4321
        server.crash("the server went away")
        await settle(pilot, 8)
        assert app.attached_to is None and isinstance(FakeClient.instances[-1], OwnWorker)
        assert app.screen.book.jobs["theirs"].status == "held"


# -- robust by construction: widgets update in place ------------------------------------------------------------
def prompt_leaf(app: TuiDiffusionApp, node_id: str = "6"):
    tree = app.screen.query_one(NodeTree)
    return tree.branch(node_id), tree


async def test_typing_a_prompt_while_the_tree_moves_never_rebuilds_or_crashes(home: Path) -> None:
    """The issue's sequence (enter, type, escape, down down up up, enter, type, escape), twelve times: the tree
    keeps its nodes, the prompt keeps its editor, and every keystroke lands in the workflow."""
    from textual.widgets import TextArea

    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        branch, tree = prompt_leaf(app)
        tree.focus()
        tree.jump_to("6", "text")
        await settle(pilot)
        leaves_before = list(tree._leaves.values())
        editor = None
        for _ in range(12):
            await pilot.press("enter", *"abc", "escape", "down", "down", "up", "up", "enter", *"more", "escape")
            focused_editor = app.screen.query_one(ParamForm).page.query_one(TextArea)
            editor = editor or focused_editor
            assert focused_editor is editor  # the same widget every time: never removed and remounted
        await settle(pilot)
        assert list(tree._leaves.values()) == leaves_before and tree.branch("6") is branch
        text = app.screen.document.workflow.inputs("6")["text"]
        assert text.startswith("abcmore" * 12)  # the editor keeps its cursor: each edit goes on the last
        assert str(tree._leaves[("6", "text")].label).startswith("text: ")


async def test_editing_keys_typed_fast_apply_in_order_while_the_screen_is_busy(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Textual runs a field's editing bindings (end, backspace) only after the key has bubbled up to the app,
    but types characters at once: with the screen busy after each edit, "end, 5, backspace x3, 3, 2" typed
    fast used to apply the characters first (a field left empty, another value in the workflow). Keys arrive
    as a terminal sends them, a burst without waiting, while each edit keeps the screen busy."""
    from textual import events

    from tui_diffusion.screens.main import MainScreen

    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        revalidate = MainScreen.revalidate

        def busy(self: MainScreen, *args: object, **kwargs: object) -> object:
            time.sleep(0.05)  # a large workflow's validation and tree relabelling, or a loaded machine
            return revalidate(self, *args, **kwargs)

        monkeypatch.setattr(MainScreen, "revalidate", busy)
        steps = field(app, "steps").query_one(NumberInput)
        steps.focus()
        await settle(pilot)
        assert steps.value == "20"
        for key in ("end", "5", "backspace", "backspace", "backspace", "3", "2"):
            event = events.Key(key, key if len(key) == 1 else None)
            event.set_sender(app)
            app._driver.send_message(event)
        await settle(pilot, 20)
        assert steps.value == "32"
        assert app.screen.document.workflow.inputs("3")["steps"] == 32
        assert not field(app, "steps").query_one(".error").has_class("shown")
        # tab, then editing keys at once: they edit the next field (cfg), not the one tab left
        for key in ("5", "tab", "end", "backspace", "backspace", "backspace", "7"):
            event = events.Key(key, key if len(key) == 1 else None)
            event.set_sender(app)
            app._driver.send_message(event)
        await settle(pilot, 20)
        assert steps.value == "325" and app.screen.document.workflow.inputs("3")["steps"] == 325
        assert app.screen.document.workflow.inputs("3")["cfg"] == 7.0


async def test_tree_labels_follow_edits_and_undo_in_place(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        steps_leaf = tree._leaves[("3", "steps")]
        editor = field(app, "steps").query_one(NumberInput)
        editor.focus()
        await pilot.press("plus")
        await settle(pilot)
        assert str(steps_leaf.label) == "steps: 21"
        await pilot.press("ctrl+z")
        await settle(pilot)
        assert tree._leaves[("3", "steps")] is steps_leaf and str(steps_leaf.label) == "steps: 20"
        assert field(app, "steps").query_one(NumberInput) is editor and editor.value == "20"
        assert app.focused is editor  # undo kept the user where they were


async def test_a_key_queued_behind_the_one_closing_a_dialog_leaves_the_main_screen(home: Path) -> None:
    """A second escape (or enter) reaching a dialog that is already closing used to pop the main screen too,
    leaving a blank terminal: found by the key storm on a loaded machine."""
    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        app.screen.query_one(NodeTree).focus()
        await pilot.press("a")
        await settle(pilot)
        dialog = app.screen
        assert type(dialog).__name__ == "ChoiceDialog"
        dialog.action_cancel()
        dialog.action_cancel()
        await settle(pilot)
        assert type(app.screen).__name__ == "MainScreen"
        assert dialog.check_action("into_list", ()) is False  # a queued "down" finds no list: it does nothing


async def test_requests_typed_ahead_for_a_node_deleted_meanwhile_are_ignored(home: Path) -> None:
    """Found by the key storm: `x` twice before the tree caught up, or enter on a link of a deleted node."""
    from tui_diffusion.widgets.param_form import SeedModeChanged, ValueEdited

    app = make_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        screen = app.screen
        screen.post_message(NodeTree.Requested("delete", "9"))
        screen.post_message(NodeTree.Requested("delete", "9"))
        screen.post_message(NodeTree.Requested("rename", "9"))
        screen.post_message(ParamForm.LinkRequested("9", "images"))
        screen.post_message(ValueEdited("9", "filename_prefix", "late", None))
        screen.post_message(SeedModeChanged("9", "seed", "increment"))
        await settle(pilot, 6)
        assert "9" not in screen.document.workflow and type(app.screen).__name__ == "MainScreen"


async def test_a_second_escape_to_the_command_palette_leaves_the_main_screen(home: Path) -> None:
    """Textual's palette pops whatever screen is on top when it closes; the app never lets that be the editor."""
    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        palette = app.screen
        assert type(palette).__name__ == "SafeCommandPalette"
        palette._action_escape()
        palette._action_escape()
        await settle(pilot)
        assert type(app.screen).__name__ == "MainScreen"
        await palette._gather_commands("queue").wait()  # a search that outlives the palette ends quietly
        assert app.is_running and palette.check_action("cursor_down", ()) is False


async def test_a_ui_error_keeps_the_workflow_and_logs_instead_of_a_traceback(home: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_diffusion.crash import crash_log_dir
    from tui_diffusion.screens.main import MainScreen
    from tui_diffusion.state import load_state

    def broken(self) -> None:
        raise KeyError("No 'text-area--gutter' key in COMPONENT_CLASSES")

    monkeypatch.setattr(MainScreen, "action_help", broken)
    before = set(crash_log_dir().glob("crash-*.log")) if crash_log_dir().is_dir() else set()
    app = make_app(home)
    with pytest.raises(KeyError):
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            app.screen.document.set_value("3", "seed", 4242)
            await pilot.press("f1")
            await settle(pilot)
    logs = set(crash_log_dir().glob("crash-*.log")) - before
    assert len(logs) == 1 and "text-area--gutter" in logs.pop().read_text()
    recovered = Path(load_state()["recovered"])
    assert json.loads(recovered.read_text())["3"]["inputs"]["seed"] == 4242
    told = "".join(str(r) for r in app._exit_renderables)
    assert "traceback" not in told.lower() or "internal error" in told


# -- the image in view -----------------------------------------------------------------------------------------
async def test_at_100_columns_the_image_shares_the_screen_and_a_finished_job_shows_itself(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        screen = app.screen
        for panel in ("#tree", "#form", "#image"):
            assert screen.query_one(panel).region.width > 0, panel
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        image = fake.run_job(fake.submitted[0][0], home / "out")
        await settle(pilot, 6)
        pane = screen.query_one(ImagePane)
        assert pane.path == image and pane.region.width >= 30 and pane.region.height >= 12
        assert isinstance(app.focused, NodeTree)  # the user kept their place


async def test_at_80_columns_the_preview_comes_up_while_sampling_unless_typing(home: Path) -> None:
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        panels = screen.query_one("#panels")
        field(app, "cfg").query_one(NumberInput).focus()  # typing in a field: left alone
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake = FakeClient.instances[-1]
        fake.run_job(fake.submitted[0][0], home / "out", finish=False)
        await settle(pilot, 6)
        assert not panels.has_class("outputs") and screen.query_one("#image").region.width == 0
        await pilot.press("escape")  # back in the tree: the next job's preview comes up by itself
        await pilot.press("ctrl+r")
        await settle(pilot)
        fake.run_job(fake.submitted[1][0], home / "out", finish=False)
        await settle(pilot, 6)
        assert panels.has_class("outputs") and screen.query_one("#image").region.width > 0
        assert screen.query_one("#tree").region.width == 0 and not isinstance(app.focused, NodeTree)
        await pilot.press("f2")  # one key back to the editor, focus with it
        await settle(pilot)
        assert screen.query_one("#tree").region.width > 0 and isinstance(app.focused, NodeTree)


# -- big workflows ---------------------------------------------------------------------------------------------------
BIG = Path(__file__).parent / "data" / "sdxl-40-nodes.ui.json"


def big_app(home: Path) -> TuiDiffusionApp:
    shutil.copy(BIG, home / "workflows" / "big.ui.json")
    return make_app(home, "workflows/big.ui.json")


def line_texts(tree: NodeTree) -> list[str]:
    return [str(line.node.label) for line in tree._tree_lines]


async def test_a_40_node_ui_file_shows_its_groups_as_levels(home: Path) -> None:
    app = big_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tops = [str(n.label) for n in tree.root.children]
        assert tops == ["▣ Models", "▣ Base sampling", "▣ Prompts", "▣ Refiner", "▣ Output", "▣ Hires fix",
                        "▣ Img2img"]
        prompts = tree.root.children[2]
        style = next(c for c in prompts.children if c.data[0] == "group")
        assert str(style.label) == "▣ Style" and {c.data[1] for c in style.children} == {"34", "35", "36", "37"}
        assert len(tree._branches) == 32  # 40 UI nodes less reroutes and notes


async def test_type_to_jump_finds_nodes_by_title_type_and_id(home: Path) -> None:
    app = big_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        await pilot.press("slash", *"hires s")
        await settle(pilot)
        assert tree.selected_node_id() == "41"  # "Hires sampler"
        await pilot.press("enter")
        await settle(pilot)
        assert app.focused is tree and app.screen.query_one(ParamForm).node_id == "41"
        await pilot.press("slash", *"vaeloader", "enter")  # by class
        await settle(pilot)
        assert tree.selected_node_id() == "32"
        await pilot.press("slash", *"47", "enter")  # by id
        await settle(pilot)
        assert tree.selected_node_id() == "47"
        await pilot.press("slash", *"decode", "down", "down")  # the third match
        await settle(pilot)
        assert tree.selected_node_id() == "48"
        await pilot.press("escape")  # escape: back where the jump started
        await settle(pilot)
        assert tree.selected_node_id() == "47" and app.focused is tree


async def test_right_and_left_open_and_close_without_moving_other_lines(home: Path) -> None:
    app = big_app(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        tree.jump_to("12")
        await settle(pilot)
        before = line_texts(tree)
        cursor = tree.cursor_line
        await pilot.press("right")
        await settle(pilot)
        after = line_texts(tree)
        assert tree.cursor_line == cursor and tree.scroll_x == 0
        assert after[: cursor + 1] == before[: cursor + 1] and after[cursor + 2:][-len(before[cursor + 1:]):] == \
            before[cursor + 1:]
        assert after[cursor + 1] == "ckpt_name: sd_xl_refiner_1.0.safetensors"
        await pilot.press("down", "up")  # moving does not open or close anything
        await settle(pilot)
        assert line_texts(tree) == after
        await pilot.press("left")
        await settle(pilot)
        assert line_texts(tree) == before and tree.cursor_line == cursor
        await pilot.press("left")  # again: up to the group
        await settle(pilot)
        assert str(tree.cursor_node.label) == "▣ Models"


async def test_follow_a_link_to_its_source_and_come_back(home: Path) -> None:
    app = big_app(home)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        tree.jump_to("10", "positive")
        await settle(pilot)
        await pilot.press("g")
        await settle(pilot)
        assert tree.selected_node_id() == "35" and tree.selected_input() is None
        await pilot.press("g")  # on a node line: nothing to follow, a hint
        await pilot.press("down", "g")  # conditioning_1 of "Subject + style" comes from the positive prompt
        await settle(pilot)
        assert tree.selected_node_id() == "6"
        await pilot.press("b")
        await settle(pilot)
        assert (tree.selected_node_id(), tree.selected_input()) == ("35", "conditioning_1")
        await pilot.press("b")
        await settle(pilot)
        assert (tree.selected_node_id(), tree.selected_input()) == ("10", "positive")


# -- the prompt editor ---------------------------------------------------------------------------------------------
async def test_prompt_editor_keys_highlight_and_token_count(home: Path) -> None:
    from tui_diffusion.widgets.prompt_editor import EMBEDDING, WEIGHT, PromptBox, PromptEditor

    app = make_app(home)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        tree = app.screen.query_one(NodeTree)
        tree.focus()
        tree.jump_to("6", "text")
        await pilot.press("enter")
        await settle(pilot)
        editor = app.focused
        assert isinstance(editor, PromptEditor)
        await pilot.press("ctrl+a")
        assert editor.selected_text == editor.text
        await pilot.press(*"a (red:1.2) fox embedding:night")
        await settle(pilot, 6)
        assert app.screen.document.workflow.inputs("6")["text"] == "a (red:1.2) fox embedding:night"
        names = {name for _, _, name in editor._highlights[0]}
        assert {WEIGHT, EMBEDDING} <= names
        box = editor.parent
        assert isinstance(box, PromptBox)
        assert str(box.query_one(".tokens").render()) == "4/75 tokens (an embedding counts as 1)"
        await pilot.press("ctrl+left", "ctrl+shift+left")  # word-wise: select "night"... back to "embedding:"
        assert editor.selected_text
        await pilot.press("ctrl+a", "ctrl+c")
        await pilot.press("ctrl+x")  # with text selected ctrl+x cuts (it does not interrupt)
        await settle(pilot)
        assert app.screen.document.workflow.inputs("6")["text"] == ""
        await pilot.press("ctrl+v", "ctrl+v")
        await settle(pilot)
        assert app.screen.document.workflow.inputs("6")["text"] == "a (red:1.2) fox embedding:night" * 2

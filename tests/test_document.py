"""Editing a workflow in memory: undo/redo, dirty state, graph edits, seed control; and the job book."""

from __future__ import annotations

import random
from pathlib import Path

from tests.conftest import TXT2IMG
from tui_diffusion import messages as m
from tui_diffusion.document import WorkflowDocument
from tui_diffusion.jobs import DONE, FAILED, PENDING, RUNNING, JobBook


def doc() -> WorkflowDocument:
    return WorkflowDocument.open(TXT2IMG)


def test_edit_undo_redo_and_dirty(tmp_path: Path) -> None:
    d = doc()
    assert not d.dirty
    assert d.set_value("3", "seed", 5)
    assert not d.set_value("3", "seed", 5)  # no-op edits leave no undo step
    assert d.dirty
    d.set_value("3", "steps", 9)
    assert d.undo() and d.workflow.inputs("3")["steps"] == 20
    assert d.undo() and not d.dirty
    assert not d.undo()
    assert d.redo() and d.workflow.inputs("3")["seed"] == 5
    d.save(tmp_path / "w.json")
    assert not d.dirty and d.name == "w.json"
    assert WorkflowDocument.open(tmp_path / "w.json").workflow.inputs("3")["seed"] == 5


def test_add_link_delete_nodes() -> None:
    d = doc()
    new = d.add_node("PreviewImage")
    assert new == "10" and d.workflow.class_type(new) == "PreviewImage"
    choices = d.compatible_outputs(new, "images")
    assert [c.label for c in choices] == ["VAE Decode.IMAGE"]
    d.link(new, "images", choices[0])
    assert d.workflow.inputs(new)["images"] == ["8", 0]
    assert d.link_label(d.workflow.links(new)["images"]) == "from VAE Decode.IMAGE"
    d.delete_node("8")
    assert "8" not in d.workflow and "images" not in d.workflow.inputs(new)
    assert any("images" in str(i) for i in d.validate(None))
    d.undo()
    assert "8" in d.workflow and d.workflow.inputs(new)["images"] == ["8", 0]


def test_unlink_restores_widget_default() -> None:
    d = doc()
    d.unlink("3", "positive")
    assert "positive" not in d.workflow.inputs("3")
    d.set_value("5", "width", 640)
    d.unlink("5", "width")
    assert d.workflow.inputs("5")["width"] == 512


def test_seed_control_after_queue() -> None:
    d = doc()
    d.set_value("3", "seed", 10)
    d.after_queue()
    assert d.workflow.inputs("3")["seed"] == 10  # fixed by default
    d.set_seed_mode("3", "seed", "increment")
    d.after_queue()
    assert d.workflow.inputs("3")["seed"] == 11
    d.set_seed_mode("3", "seed", "decrement")
    d.after_queue()
    assert d.workflow.inputs("3")["seed"] == 10
    d.set_seed_mode("3", "seed", "randomize")
    d.after_queue(random.Random(1))
    assert d.workflow.inputs("3")["seed"] != 10
    assert d.workflow.nodes["3"]["_meta"]["control_after_generate"] == {"seed": "randomize"}


def test_job_book_follows_events() -> None:
    book = JobBook()
    job = book.add("1", {}, "txt2img")
    book.add("2", {}, "txt2img")
    assert job.status == PENDING
    book.apply(m.JobStarted("1"), now=0.0)
    book.apply(m.NodeStarted("1", "3"), now=0.0)
    for step, t in ((1, 1.0), (2, 2.0)):
        book.apply(m.Progress("1", "3", step, 10, b"png"), now=t)
    assert job.status == RUNNING and job.step == 2 and job.eta == 8.0 and job.preview_png == b"png"
    book.apply(m.JobFinished("1", ["/x.png"], ["3"], ["4"], {"3": 1.0}, 2.0), now=3.0)
    assert job.status == DONE and job.outputs == ["/x.png"] and job.eta is None
    book.apply(m.JobStarted("2"), now=4.0)
    resubmit = book.worker_lost("the worker process ended (signal 9)")
    assert book.jobs["2"].status == FAILED and "signal 9" in book.jobs["2"].error and resubmit == []


def test_move_to_front_keeps_running_and_finished_ahead() -> None:
    book = JobBook()
    for i in "1234":
        book.add(i, {}, "x")
    book.apply(m.JobStarted("1"))
    book.move_to_front("4")
    assert [j.job_id for j in book.ordered()] == ["1", "4", "2", "3"]


def test_typing_a_prompt_is_one_undo_step() -> None:
    d = doc()
    for text in ("a", "a c", "a ca", "a cat"):
        d.set_value("6", "text", text, coalesce=True)
    d.set_value("3", "steps", 5)
    d.undo()
    assert d.workflow.inputs("6")["text"] == "a cat"
    d.undo()
    assert d.workflow.inputs("6")["text"] == json_text()


def json_text() -> str:
    import json

    return json.loads(TXT2IMG.read_text())["6"]["inputs"]["text"]


def test_a_ui_format_file_is_saved_back_in_ui_format(tmp_path: Path) -> None:
    import json
    import shutil

    path = tmp_path / "graph.json"
    shutil.copy(Path(__file__).parent / "data" / "comfyui-default-graph.ui.json", path)
    d = WorkflowDocument.open(path)
    d.set_value("3", "steps", 12)
    d.save()
    saved = json.loads(path.read_text())
    assert "nodes" in saved and next(n for n in saved["nodes"] if n["id"] == 3)["widgets_values"][2] == 12


def test_a_workflow_opened_from_a_png_is_untitled(tmp_path: Path) -> None:
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", TXT2IMG.read_text())
    png = tmp_path / "made.png"
    Image.new("RGB", (4, 4)).save(png, pnginfo=info)
    d = WorkflowDocument.open(png)
    assert d.path is None and d.workflow.class_type("3") == "KSampler"
    d.save(tmp_path / "made.json")
    assert json.loads((tmp_path / "made.json").read_text())["3"]["class_type"] == "KSampler"
    assert Image.open(png).size == (4, 4)  # the image is untouched

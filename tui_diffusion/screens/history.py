"""History and gallery: past jobs with a thumbnail of their image; reopen a job's workflow or delete it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from tui_diffusion.screens.dialogs import ConfirmDialog, DismissOnce
from tui_diffusion.store.history import History, JobRow
from tui_diffusion.text import printable
from tui_diffusion.widgets.image_pane import ImagePane, is_image_file
from tui_diffusion.widgets.keys import OrderedInput


class HistoryScreen(DismissOnce, Screen):
    DEFAULT_CSS = """
    #filter { margin: 0 1; }
    #history-body { height: 1fr; }
    #jobs { width: 3fr; border: round $primary; }
    #thumb-column { width: 2fr; }
    #thumb { height: 1fr; border: round $primary; }
    #details { height: auto; max-height: 8; padding: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("enter", "reopen", "Open workflow", tooltip="Open this job's workflow in the editor"),
        Binding("delete", "delete", "Delete", tooltip="Delete this job and its image files"),
        Binding("ctrl+f", "focus_filter", "Filter", tooltip="Filter by prompt text"),
    ]

    def __init__(self, history: History) -> None:
        super().__init__()
        self.history = history
        self.rows: dict[str, JobRow] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield OrderedInput(placeholder="filter by prompt text (ctrl+f)", id="filter")
        with Horizontal(id="history-body"):
            yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            with Vertical(id="thumb-column"):
                yield ImagePane(id="thumb")
                yield Static("", id="details")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#jobs", DataTable)
        table.border_title = "History"
        table.add_columns("when", "status", "time", "prompt")
        self.reload()
        table.focus()

    def reload(self, text: str | None = None) -> None:
        table = self.query_one("#jobs", DataTable)
        table.clear()
        self.rows = {r.id: r for r in self.history.jobs(limit=500, text=text or None)}
        for row in self.rows.values():
            when = time.strftime("%m-%d %H:%M", time.localtime(row.created))
            prompt = printable(row.prompt.split("\n", 1)[0][:70])
            table.add_row(when, printable(row.status), f"{row.seconds or 0:.1f}s", Text(prompt), key=row.id)
        if not self.rows:
            self.query_one(ImagePane).clear("no jobs" + (" match" if text else " recorded yet"))

    def selected(self) -> JobRow | None:
        table = self.query_one("#jobs", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.rows.get(key)

    @on(DataTable.RowHighlighted)
    def _show(self, event: DataTable.RowHighlighted) -> None:
        row = self.rows.get(event.row_key.value) if event.row_key else None
        if row is None:
            return
        pane = self.query_one(ImagePane)
        image = next((Path(o["path"]) for o in row.outputs if is_image_file(o["path"]) and Path(o["path"]).is_file()),
                     None)
        if image is not None:
            pane.show_file(image, image.name)  # still a message, not a crash, if it went or is not an image
        else:
            pane.clear("no image" if row.status == "ok" else row.status)
        changed = ", ".join(f"{k}: {v[1] if isinstance(v, list) else v}" for k, v in row.changes.items())
        lines = [f"{row.status} on {row.device}" + (f" in {row.seconds:.1f}s" if row.seconds else "")]
        if row.error:
            lines.append(row.error)
        if changed:
            lines.append(f"changed: {changed}")
        lines.append(row.prompt.replace("\n", " | ")[:200])
        # names and prompts come from workflows and disk: escaped, and never read as markup
        self.query_one("#details", Static).update(Text("\n".join(printable(line) for line in lines)))

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        self.action_reopen()

    @on(Input.Changed, "#filter")
    def _filter(self, event: Input.Changed) -> None:
        self.reload(event.value)

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_back(self) -> None:
        self.dismiss(None)

    def action_reopen(self) -> None:
        row = self.selected()
        if row is not None:
            self.dismiss(row.workflow)

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return
        files = [o["path"] for o in row.outputs if Path(o["path"]).is_file()]

        def answered(answer: Any) -> None:
            if answer == "delete":
                removed = self.history.delete_job(row.id, delete_files=True)
                self.notify(f"deleted the job and {len(removed)} file(s)")
                self.reload(self.query_one("#filter", Input).value)

        self.app.push_screen(ConfirmDialog(f"Delete this job and its {len(files)} image file(s)?",
                                           [("delete", "Delete"), ("cancel", "Cancel")]), answered)

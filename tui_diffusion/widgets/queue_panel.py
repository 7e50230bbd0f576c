"""The queue: every job with its state, progress, ETA and outcome."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from tui_diffusion.jobs import DONE, FAILED, HELD, INTERRUPTED, PENDING, REMOVED, RUNNING, JobRecord

_STYLE = {PENDING: "yellow", RUNNING: "bold cyan", DONE: "green", FAILED: "bold red", INTERRUPTED: "magenta",
          REMOVED: "dim", HELD: "italic yellow"}


#: the longest error shown in a queue cell
ERROR_CELL = 48


def _bar(step: int, total: int, width: int = 12) -> str:
    filled = int(width * step / max(total, 1))
    return "█" * filled + "░" * (width - filled)


def describe(job: JobRecord, bar: int = 12) -> Text:
    """The progress cell; ``bar`` cells of progress bar (fewer in a narrow pane). The step count comes first:
    what a cut cell keeps."""
    text = Text()
    if job.status == RUNNING:
        if job.total:
            text.append(f"{job.step}/{job.total} {_bar(job.step, job.total, bar)}")
            if job.eta is not None:
                text.append(f" ETA {job.eta:.0f}s", style="dim")
        else:
            text.append(f"node {job.node_id or '…'}", style="dim")
    elif job.status == DONE:
        text.append(f"{job.seconds:.1f}s · ran {len(job.executed)}, cached {len(job.cached)}")
    elif job.status == FAILED:  # the first line, cut: the image pane shows the whole message
        lines = (job.error or "").strip().splitlines()
        error = lines[0] if lines else "failed"
        text.append(error if len(error) <= ERROR_CELL else error[:ERROR_CELL - 1] + "…", style="red")
    return text


class QueuePanel(DataTable):
    BINDINGS = [
        Binding("t", "to_front", "To front", tooltip="Move the selected pending job to the front"),
        Binding("delete,d", "remove", "Remove", tooltip="Remove the selected pending job"),
    ]

    class JobChosen(Message):
        def __init__(self, job_id: str) -> None:
            super().__init__()
            self.job_id = job_id

    class Requested(Message):
        def __init__(self, action: str, job_id: str) -> None:
            super().__init__()
            self.action = action
            self.job_id = job_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        #: where ``show`` last put the cursor, until its highlight arrives (not a choice of the user's)
        self._placed: str | None = None

    def on_mount(self) -> None:
        # progress before the job's label: its width is bounded, and on a narrow pane it stays in sight
        self._columns = self.add_columns("#", "state", "progress", "job")
        self._order: list[str] = []

    def _cells(self, job: JobRecord) -> tuple[str, Text, Text, Text]:
        label = Text(job.label)
        if job.worker:  # a pool or Ray: which worker or actor has it
            label.append(f" · {job.worker}", style="dim")
        bar = 12 if self.size.width >= 60 else 6
        return str(job.number), Text(job.status, style=_STYLE.get(job.status, "")), describe(job, bar), label

    def show(self, jobs: list[JobRecord], selected: str | None) -> None:
        """Cells update in place while the jobs are the same, in the same order (progress, state); the rows
        are laid out again only when a job comes, goes or moves."""
        order = [j.job_id for j in jobs]
        if order == self._order:
            for job in jobs:
                for column, value in zip(self._columns, self._cells(job), strict=True):
                    if str(self.get_cell(job.job_id, column)) != str(value):
                        self.update_cell(job.job_id, column, value)
            if selected in order and selected != self.selected_job():
                self._placed = selected
                self.move_cursor(row=self.get_row_index(selected))
            return
        keep = selected or self.selected_job()
        self.clear()
        self._order = order
        for job in jobs:
            self.add_row(*self._cells(job), key=job.job_id)
        if keep is not None and keep in order:
            self._placed = keep
            self.move_cursor(row=self.get_row_index(keep))

    def selected_job(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # no row under the cursor
            return None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """The user's choice only: a highlight that ``show`` caused (the rows laid out again put the cursor on the
        first row, then on the selected one) is not a choice, and taking it for one stopped the pane from
        following the latest job once a second job was queued."""
        if event.row_key is None or event.row_key.value is None:
            return
        key = event.row_key.value
        if key != self.selected_job():
            return  # stale: the cursor has moved since (the rows were laid out again)
        if key == self._placed:
            self._placed = None
            return
        self._placed = None
        self.post_message(self.JobChosen(key))

    def action_to_front(self) -> None:
        if (job := self.selected_job()) is not None:
            self.post_message(self.Requested("to_front", job))

    def action_remove(self) -> None:
        if (job := self.selected_job()) is not None:
            self.post_message(self.Requested("remove", job))

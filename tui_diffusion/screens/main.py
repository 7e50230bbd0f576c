"""The main screen: node tree | parameter form | image and queue. Wires the panels together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header

from tui_diffusion import messages as m
from tui_diffusion.bridge import EngineEvent, WorkerLost
from tui_diffusion.document import WorkflowDocument
from tui_diffusion.graph.specs import NODE_SPECS
from tui_diffusion.graph.validate import ValidationIssue
from tui_diffusion.graph.workflow import Workflow, WorkflowError
from tui_diffusion.jobs import DONE, HELD, PENDING, RUNNING, JobBook
from tui_diffusion.widgets.image_pane import ImagePane, latest_image
from tui_diffusion.widgets.jump_bar import JumpBar
from tui_diffusion.widgets.node_tree import NodeStatus, NodeTree
from tui_diffusion.widgets.param_form import ParamForm, SeedModeChanged, ValueEdited
from tui_diffusion.widgets.queue_panel import QueuePanel

# The dialogs are imported where they open: their widgets are not needed for the first frame.

NARROW = 100  # columns below which the panels switch instead of sitting side by side
WIDE = 140  # columns from which the form gets the room it wants; below, the image keeps a third


class MainScreen(Screen):
    DEFAULT_CSS = """
    #panels { height: 1fr; }
    #left { width: 30%; }
    #tree { height: 1fr; border: round $primary; overflow-x: hidden; }
    #jump { display: none; border: round $accent; height: 3; }
    #form { width: 38%; border: round $primary; }
    #right { width: 1fr; }
    #image { height: 1fr; border: round $primary; }
    #queue { height: 12; border: round $primary; }
    #panels.medium #left { width: 28%; }
    #panels.medium #form { width: 1fr; }
    #panels.medium #right { width: 34%; }
    #panels.medium #queue { height: 8; }
    #panels.narrow #left { width: 40%; }
    #panels.narrow #form { width: 1fr; }
    #panels.narrow #right { display: none; }
    #panels.narrow.outputs #left, #panels.narrow.outputs #form { display: none; }
    #panels.narrow.outputs #right { display: block; width: 1fr; }
    #panels.narrow #queue { height: 9; }
    """

    BINDINGS = [
        # in footer order: what an 80-column footer must still show comes first
        Binding("ctrl+r,ctrl+enter", "queue", "Queue", priority=True, tooltip="Queue the workflow"),
        Binding("f2", "switch_panels", "Image", priority=True,
                tooltip="Switch editor / image and queue (small terminals)"),
        Binding("ctrl+x", "interrupt", "Interrupt", priority=True, tooltip="Interrupt the running job"),
        Binding("question_mark,f1", "help", "Help", tooltip="Show every key"),
        Binding("v", "full_view", "View", tooltip="Show the current image full-size"),
        Binding("ctrl+b", "queue_many", "Queue N", priority=True, tooltip="Queue N copies with the next seeds"),
        Binding("ctrl+z", "undo", "Undo", priority=True, tooltip="Undo the last edit"),
        Binding("ctrl+y", "redo", "Redo", priority=True, tooltip="Redo"),
        Binding("ctrl+s", "save", "Save", priority=True, tooltip="Save the workflow"),
        Binding("f3", "save_as", "Save as", priority=True, tooltip="Save the workflow under a new name"),
        Binding("ctrl+o", "open", "Open", priority=True, tooltip="Open a workflow"),
        Binding("ctrl+n", "new", "New", priority=True, show=False, tooltip="New workflow from the default graph"),
        Binding("f4", "history", "History", priority=True, tooltip="Past jobs with their images"),
        Binding("f5", "graph", "Graph", priority=True, show=False,
                tooltip="The workflow as a graph: arrows move, enter opens the node, f5 or escape closes"),
        Binding("R", "resume", "Resume", show=False,
                tooltip="Queue again the jobs a worker left unfinished (a crash, a reboot, a closed terminal)"),
        Binding("escape", "focus_tree", "Tree", show=False, tooltip="Back to the node tree"),
        Binding("ctrl+t", "focus_queue", "Queue panel", show=False, tooltip="Go to the queue"),
    ]

    def __init__(self, document: WorkflowDocument) -> None:
        super().__init__()
        self.document = document
        self.book = JobBook()
        self.issues: list[ValidationIssue] = []
        self.node_status: dict[str, NodeStatus] = {}
        self.selected_node: str | None = None
        self.selected_job: str | None = None
        self.follow_latest = True
        self.auto_outputs = False  # the narrow layout switched to the image by itself (a job is sampling)
        self._jump_from: tuple[str | None, str | None] = (None, None)

    # -- layout --------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="panels"):
            with Vertical(id="left"):
                yield NodeTree(id="tree")
                yield JumpBar(id="jump")
            yield ParamForm(id="form")
            with Vertical(id="right"):
                yield ImagePane(id="image")
                yield QueuePanel(id="queue")
        yield Footer()

    @property
    def models(self):  # noqa: ANN201
        return self.app.models

    async def on_mount(self) -> None:
        self.query_one("#tree").border_title = "Nodes"
        self.query_one("#form").border_title = "Parameters"
        self.query_one("#queue").border_title = "Queue"
        self.query_one("#image").border_title = "Image"
        self._apply_size(self.app.size.width)
        first = next(iter(self.document.workflow), None)
        self.selected_node = next((n for n in self.document.workflow if self.document.workflow.class_type(n)
                                   == "KSampler"), first)
        # The tree first; the form page (the costliest widgets to build and style) once the first frame is drawn
        # (the app calls ``first_frame_drawn``), so the app is up and takes keys sooner. A node selected before
        # then builds its own page.
        self.revalidate()
        self.query_one(NodeTree).show(self.document, self.issues, self.node_status, self.selected_node)
        self.query_one(NodeTree).focus()
        self.run_worker(self._find_left_over, thread=True, exclusive=True, group="left-over")

    def first_frame_drawn(self) -> None:
        self.call_later(self._first_form)

    async def _first_form(self) -> None:
        form = self.query_one(ParamForm)
        if form.node_id is None:
            await form.show_node(self.document, self.selected_node, self.models, self.issues)

    def _find_left_over(self) -> None:
        """Jobs a worker that is gone left in the store: shown as held until resumed (R) or removed."""
        rows = self.app.bridge.left_over()
        if rows:
            self.app.call_from_thread(self._show_left_over, rows)

    def _show_left_over(self, rows: list[Any]) -> None:
        held = 0
        for row in rows:
            if row.id in self.book.jobs:
                continue  # a background server already runs it
            record = self.book.add(row.id, row.workflow, self._job_label(row.workflow))
            record.status = HELD
            record.error = "interrupted" if row.status == "running" else None
            held += 1
        if held:
            self.refresh_queue()
            self.notify(f"{held} job(s) were left unfinished by a worker that stopped (a crash, a reboot or a "
                        "closed terminal). Press R to queue them again, or remove them in the queue.",
                        severity="warning", timeout=15)

    def action_resume(self) -> None:
        held = self.book.held()
        if not held:
            self.notify("no held jobs to resume")
            return
        for job in held:
            job.status, job.error = PENDING, None
            self.app.bridge.submit(job.workflow, job_id=job.job_id)
        self.refresh_queue()
        self.notify(f"queued {len(held)} held job(s) again")

    def _discard_held(self, job: Any) -> None:
        why = self.app.bridge.discard(job.job_id)
        if why is not None:
            self.notify(f"could not update the store: {why}", severity="error")
        job.status = "removed"
        self.refresh_queue()

    def on_resize(self, event: Any) -> None:
        self._apply_size(event.size.width)

    def _apply_size(self, width: int) -> None:
        panels = self.query_one("#panels")
        if panels.has_class("narrow") != (width < NARROW):
            self.refresh_bindings()  # f2 is offered only where it switches something
        panels.set_class(width < NARROW, "narrow")
        panels.set_class(NARROW <= width < WIDE, "medium")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "switch_panels" and (panels := self.query("#panels")):
            return panels.first().has_class("narrow")
        return True

    # -- refresh helpers ---------------------------------------------------------------------------------------
    def revalidate(self) -> None:
        config = self.app.config
        self.issues = self.document.validate(self.models, config.limits, config.allow_pickle)
        self.app.update_title()

    async def refresh_all(self, focus: str | None = None, select: bool = False) -> None:
        """Bring tree and form up to date with the document, in place (``select``: move the tree's cursor to
        ``selected_node``, after a node was added, deleted or a workflow opened)."""
        self.revalidate()
        if self.selected_node is not None and self.selected_node not in self.document.workflow:
            self.selected_node = next(iter(self.document.workflow), None)
            select = True
        self.query_one(NodeTree).show(self.document, self.issues, self.node_status,
                                      self.selected_node if select else None)
        await self.query_one(ParamForm).show_node(self.document, self.selected_node, self.models, self.issues,
                                                  focus=focus)

    def refresh_tree(self) -> None:
        self.query_one(NodeTree).show(self.document, self.issues, self.node_status, self.selected_node)

    def refresh_queue(self) -> None:
        self.query_one(QueuePanel).show(self.book.ordered(), self.selected_job)

    # -- tree and form events --------------------------------------------------------------------------------
    @on(NodeTree.NodeSelected)
    async def _node_selected(self, event: NodeTree.NodeSelected) -> None:
        if event.node_id != self.selected_node or self.query_one(ParamForm).node_id != event.node_id:
            self.selected_node = event.node_id
            await self.query_one(ParamForm).show_node(self.document, event.node_id, self.models, self.issues)

    @on(NodeTree.JumpRequested)
    def _jump_requested(self) -> None:
        tree = self.query_one(NodeTree)
        self._jump_from = (tree.selected_node_id(), tree.selected_input())
        self.query_one(JumpBar).open()

    @on(JumpBar.Search)
    def _jump_search(self, event: JumpBar.Search) -> None:
        from tui_diffusion.widgets.node_tree import find_nodes

        bar = self.query_one(JumpBar)
        matches = find_nodes(self.document, event.query)
        if not matches:
            bar.border_title = "no match" if event.query.strip() else "jump"
            return
        index = event.index % len(matches)
        bar.border_title = f"{index + 1}/{len(matches)}"
        self.query_one(NodeTree).jump_to(matches[index])

    @on(JumpBar.Done)
    def _jump_done(self, event: JumpBar.Done) -> None:
        tree = self.query_one(NodeTree)
        self.query_one(JumpBar).close()
        if not event.accepted and self._jump_from[0] is not None:
            tree.jump_to(*self._jump_from)
        tree.focus()

    @on(NodeTree.EditRequested)
    async def _edit_requested(self, event: NodeTree.EditRequested) -> None:
        form = self.query_one(ParamForm)
        if form.node_id != event.node_id:
            self.selected_node = event.node_id
            await form.show_node(self.document, event.node_id, self.models, self.issues)
        form.focus_input(event.input_name)

    @on(ValueEdited)
    def _value_edited(self, event: ValueEdited) -> None:
        if not self._exists(event.node_id):
            return
        typed = isinstance(event.value, str)
        if event.error is None and self.document.set_value(event.node_id, event.name, event.value, coalesce=typed):
            self.revalidate()
            self.query_one(ParamForm).show_issues(self.issues)
            self.refresh_tree()  # labels only, in place

    def _exists(self, node_id: str | None) -> bool:
        """Whether an event's node is still there: keys typed ahead can ask about a node an earlier key
        deleted (or an undo took away)."""
        return node_id is not None and node_id in self.document.workflow

    @on(SeedModeChanged)
    def _seed_mode(self, event: SeedModeChanged) -> None:
        if self._exists(event.node_id):
            self.document.set_seed_mode(event.node_id, event.name, event.mode)

    @on(ParamForm.LinkRequested)
    def _link_requested(self, event: ParamForm.LinkRequested) -> None:
        if not self._exists(event.node_id):
            return
        refs = self.document.compatible_outputs(event.node_id, event.name)
        options = [(f"{r.node_id}:{r.index}", f"{r.label}  [dim](node {r.node_id})[/]") for r in refs]
        options.append(("-", "disconnect"))

        async def done(answer: str | None) -> None:
            if answer is None or not self._exists(event.node_id):
                return
            if answer == "-":
                self.document.unlink(event.node_id, event.name)
            else:
                ref = next(r for r in refs if f"{r.node_id}:{r.index}" == answer)
                self.document.link(event.node_id, event.name, ref)
            await self.refresh_all(focus=event.name)

        from tui_diffusion.screens.dialogs import ChoiceDialog
        self.app.push_screen(ChoiceDialog(f"Connect {event.name} to…", options), done)

    @on(NodeTree.Requested)
    def _tree_request(self, event: NodeTree.Requested) -> None:
        if event.action != "add" and not self._exists(event.node_id):
            return
        if event.action == "add":
            options = [(s.class_type, f"{s.display_name}  [dim]{s.class_type} · {s.category}[/]")
                       for s in NODE_SPECS.values()]

            async def added(class_type: str | None) -> None:
                if class_type:
                    self.selected_node = self.document.add_node(class_type)
                    await self.refresh_all(select=True)

            from tui_diffusion.screens.dialogs import ChoiceDialog
            self.app.push_screen(ChoiceDialog("Add node", options), added)
        elif event.action == "delete" and event.node_id:
            self.document.delete_node(event.node_id)
            self.selected_node = next(iter(self.document.workflow), None)
            self.notify(f"deleted node {event.node_id} (ctrl+z to undo)")
            self.call_later(self.refresh_all, select=True)
        elif event.action == "rename" and event.node_id:
            async def renamed(title: str | None) -> None:
                if title and self._exists(event.node_id):
                    self.document.rename(event.node_id, title)
                    await self.refresh_all()

            from tui_diffusion.screens.dialogs import PromptDialog
            self.app.push_screen(PromptDialog("Node title", self.document.workflow.title(event.node_id)), renamed)

    # -- queue ------------------------------------------------------------------------------------------------
    def _blocked(self) -> bool:
        self.revalidate()
        if self.issues:
            self.refresh_tree()
            self.query_one(ParamForm).show_issues(self.issues)
            detail = "\n".join(str(i) for i in self.issues[:4])
            self.notify(f"Not queued: fix these first\n{detail}", severity="error", timeout=8)
            return True
        form_errors = self.query_one(ParamForm).errors
        if form_errors:
            (node_id, name), why = next(iter(form_errors.items()))
            self.notify(f"Not queued: node {node_id}, input {name!r}: {why}", severity="error", timeout=8)
            return True
        return False

    def queue_current(self) -> str:
        data = self.document.workflow.to_data()
        job_id = self.app.bridge.submit(data)  # the queue's id (and its durable row)
        self.book.add(job_id, data, self._job_label(data))
        return job_id

    def _job_label(self, data: dict[str, Any]) -> str:
        seeds = [str(data[n]["inputs"][s]) for n, s in self.document.seed_inputs()
                 if s in (data.get(n) or {}).get("inputs", {})]  # a job from another client may differ
        return f"seed {','.join(seeds)}" if seeds else self.document.name.removesuffix(".json")

    async def action_queue(self) -> None:
        if self._blocked():
            return
        self.queue_current()
        self.follow_latest = True
        self.document.after_queue()
        self.refresh_queue()
        await self.refresh_all()

    def action_queue_many(self) -> None:
        if self._blocked():
            return

        async def count(answer: str | None) -> None:
            if not answer:
                return
            try:
                n = int(answer)
            except ValueError:
                self.notify(f"{answer!r} is not a number", severity="error")
                return
            seeds = self.document.seed_inputs()
            for _ in range(max(1, min(n, 100))):
                self.queue_current()
                for node_id, name in seeds:
                    value = self.document.workflow.inputs(node_id)[name]
                    self.document.set_value(node_id, name, value + 1)
            self.refresh_queue()
            await self.refresh_all()

        from tui_diffusion.screens.dialogs import PromptDialog
        self.app.push_screen(PromptDialog("Queue how many copies (seed +1 each)?", "4"), count)

    def action_interrupt(self) -> None:
        from textual.widgets import TextArea

        focused = self.app.focused
        if isinstance(focused, TextArea) and focused.selected_text:  # ctrl+x on selected text: cut it
            focused.action_cut()
            return
        running = self.book.running()
        if running is None:
            self.notify("nothing is running")
            return
        self.app.bridge.cancel(running.job_id)
        self.notify(f"interrupting job {running.number}")

    @on(QueuePanel.Requested)
    def _queue_request(self, event: QueuePanel.Requested) -> None:
        job = self.book.jobs.get(event.job_id)
        if job is not None and job.status == HELD:
            if event.action == "remove":
                self._discard_held(job)
            else:
                self.notify("press R to queue the held jobs again", severity="warning")
            return
        if job is None or job.status != PENDING:
            self.notify("only pending jobs can be moved or removed", severity="warning")
            return
        if event.action == "remove":
            self.app.bridge.cancel(job.job_id)
        else:
            self.app.bridge.move_to_front(job.job_id)
            self.book.move_to_front(job.job_id)
            self.refresh_queue()

    @on(QueuePanel.JobChosen)
    def _job_chosen(self, event: QueuePanel.JobChosen) -> None:
        if event.job_id == self.selected_job:
            return
        self.selected_job = event.job_id
        latest = self.book.ordered()[-1].job_id if self.book.jobs else None
        self.follow_latest = event.job_id == latest
        self._show_job_image(self.book.jobs.get(event.job_id))

    def _show_job_image(self, job: Any) -> None:
        pane = self.query_one(ImagePane)
        if job is None:
            return
        image = latest_image(job.outputs) if job.status == DONE else None
        if image is not None:
            pane.show_file(image, f"job {job.number}: {image.name}")
        elif job.status == DONE and job.outputs:  # a latent, or another file the pane cannot draw
            pane.clear(f"job {job.number}: done, no image to show ({Path(job.outputs[-1]).name})")
        elif job.preview_png:
            pane.show_preview(job.preview_png, f"job {job.number}: preview {job.step}/{job.total}")
        else:
            pane.clear(f"job {job.number}: {job.status}")

    # -- worker events ------------------------------------------------------------------------------------------
    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        if isinstance(event, m.WorkerReady):
            self.app.worker_state = f"ready: {event.device_name}"
            return
        if isinstance(event, m.WorkerFailed):
            if event.held is not None:  # the runtime gave up restarting it
                self._stopped(event.message, [self.book.jobs[j] for j in event.held if j in self.book.jobs])
                return
            self.app.worker_state = "failed to start"
            self.notify(event.message, severity="error", timeout=15)
            return
        if isinstance(event, m.ServerLost):
            self._server_lost(event.reason)
            return
        if isinstance(event, m.Attached):  # a background server: its worker and every job it knows
            if event.ready is not None:
                self.app.worker_state = f"ready: {event.ready.device_name}"
            for summary in event.jobs:
                self.book.add_summary(summary, self._job_label(summary.workflow))
            self.app.attached_to = event.server_pid
            self.notify(f"attached to the background server (pid {event.server_pid}): "
                        f"{len(event.jobs)} job(s); quitting leaves it running")
            self._update_worker_state()
            self.refresh_queue()
            return
        if isinstance(event, m.JobQueued):
            if event.job.job_id not in self.book.jobs:  # queued by another attached client
                self.book.add_summary(event.job, self._job_label(event.job.workflow))
                self.refresh_queue()
            return
        if isinstance(event, m.WorkerRestarted):
            self.app.worker_state = "crashed: restarting"
            self.notify(f"The worker stopped ({event.reason}); restarting it. "
                        f"{len(event.resubmitted)} pending job(s) kept.", severity="error", timeout=10)
            return
        if isinstance(event, m.Notice):
            self.notify(event.message, severity="warning", timeout=10)
            return
        job = self.book.apply(event)
        if job is None:
            return
        if isinstance(event, m.JobStarted):
            self.node_status = {}
            if self.follow_latest:
                self.selected_job = job.job_id
        if isinstance(event, m.NodeStarted):
            self.node_status[event.node_id] = NodeStatus("executing")
            self.refresh_tree()
        elif isinstance(event, m.NodeFinished):
            self.node_status[event.node_id] = NodeStatus("executed", event.seconds)
            self.refresh_tree()
        elif isinstance(event, m.NodeCached):
            self.node_status[event.node_id] = NodeStatus("cached")
        elif isinstance(event, m.JobFailed):
            if event.node_id:
                self.node_status[event.node_id] = NodeStatus("failed")
            self.notify(f"job {job.number} failed: {event.message}", severity="error", timeout=10)
            self.refresh_tree()
        elif isinstance(event, m.JobFinished) and event.status == "interrupted":
            self.notify(f"job {job.number} interrupted")
        self._update_worker_state()
        if job.job_id == self.selected_job or (self.follow_latest and job.status == RUNNING):
            self.selected_job = job.job_id
            if isinstance(event, (m.Progress, m.JobFinished, m.JobFailed, m.JobStarted)):
                self._show_job_image(job)
            if isinstance(event, m.Progress) and event.preview_png:
                self._show_outputs_while_sampling()
        self.refresh_queue()

    def _update_worker_state(self) -> None:
        running = self.book.running()
        if running is not None:
            where = f"{running.step}/{running.total}" if running.total else f"node {running.node_id or '…'}"
            self.app.worker_state = f"busy: job {running.number} {where}"
        elif self.app.worker_state.startswith("busy"):
            self.app.worker_state = "ready: idle"

    @on(WorkerLost)
    def _worker_lost(self, message: WorkerLost) -> None:
        """The runtime ended for good: what was queued is held (in the store) for R after a fix."""
        if self.app.worker_state == "stopped":
            return  # said already, when the runtime gave up
        self._stopped(message.reason, self.book.worker_lost(f"the worker crashed: {message.reason}"))

    def _stopped(self, reason: str, held: list[Any]) -> None:
        for job in held:
            job.status = HELD
        self.app.worker_state = "stopped"
        self.notify(f"The worker stopped again ({reason}); not restarting it. Fix the cause, restart "
                    "the app, and press R to queue the held jobs again.", severity="error", timeout=30)
        self.refresh_queue()

    def _server_lost(self, reason: str) -> None:
        """The background server went away and the runtime goes on with a worker of this app's own. What the
        server had queued is in the store and shows up as held (R queues it here)."""
        self.app.attached_to = None
        for job in self.book.ordered():
            if job.status in (PENDING, RUNNING):
                job.status, job.node_id = HELD, None
        self.app.worker_state = "starting…"
        self.notify(f"The background server is gone ({reason}); this app now runs its own worker. "
                    "Jobs it had queued are held: R queues them here.", severity="warning", timeout=15)
        self.refresh_queue()

    # -- files --------------------------------------------------------------------------------------------------
    def action_save(self) -> None:
        if self.document.path is None:
            self.action_save_as()
            return
        self._save(self.document.path)

    def _save(self, path: Path) -> None:
        try:
            self.document.save(path)
        except OSError as exc:
            self.notify(f"{path}: cannot save: {exc.strerror or exc}", severity="error")
            return
        self.app.remember(path)
        self.app.update_title()
        self.notify(f"saved {path}")

    def action_save_as(self) -> None:
        current = str(self.document.path or Path("workflows") / "untitled.json")

        def chosen(answer: str | None) -> None:
            if answer:
                self._save(Path(answer).expanduser())

        from tui_diffusion.screens.dialogs import PromptDialog
        self.app.push_screen(PromptDialog("Save workflow as", current), chosen)

    def action_open(self) -> None:
        def chosen(answer: str | None) -> None:
            if answer:
                self._confirm_discard(lambda: self.call_later(self.load, self.app.workflow_path(answer)))

        from tui_diffusion.screens.dialogs import OpenDialog
        self.app.push_screen(OpenDialog(self.app.workflow_folders()), chosen)

    def action_new(self) -> None:
        self._confirm_discard(lambda: self.call_later(self.load, self.app.default_workflow, True))

    async def load(self, path: Path, as_new: bool = False) -> None:
        try:
            doc = WorkflowDocument(Workflow.load(path), None) if as_new else WorkflowDocument.open(path)
        except (WorkflowError, OSError) as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.document = doc
        self.node_status = {}
        self.selected_node = next((n for n in doc.workflow if doc.workflow.class_type(n) == "KSampler"),
                                  next(iter(doc.workflow), None))
        if not as_new:
            self.app.remember(path)
        await self.refresh_all(select=True)
        if doc.notice:
            self.notify(doc.notice, severity="warning", timeout=15)

    def _confirm_discard(self, then: Any) -> None:
        if not self.document.dirty:
            then()
            return

        def answered(answer: str | None) -> None:
            if answer == "save":
                self.action_save()
                then()
            elif answer == "discard":
                then()

        from tui_diffusion.screens.dialogs import ConfirmDialog
        self.app.push_screen(ConfirmDialog(f"{self.document.name} has unsaved changes.",
                                           [("save", "Save"), ("discard", "Discard"), ("cancel", "Cancel")]),
                             answered)

    # -- misc ---------------------------------------------------------------------------------------------------
    async def action_undo(self) -> None:
        if self.document.undo():
            await self.refresh_all(focus=self._focused_input())
        else:
            self.notify("nothing to undo")

    async def action_redo(self) -> None:
        if self.document.redo():
            await self.refresh_all(focus=self._focused_input())

    def _focused_input(self) -> str | None:
        from tui_diffusion.widgets.param_form import Field

        focused = self.app.focused
        for ancestor in focused.ancestors if focused else ():
            if isinstance(ancestor, Field):
                return ancestor.input_name
        return None

    def _show_outputs_while_sampling(self) -> None:
        """Narrow terminals: the live preview comes up by itself, unless the user is typing in a field."""
        from textual.widgets import Input, TextArea

        panels = self.query_one("#panels")
        if not panels.has_class("narrow") or panels.has_class("outputs"):
            return
        if isinstance(self.app.focused, (Input, TextArea)) or self.app.screen is not self:
            return
        panels.add_class("outputs")
        self.auto_outputs = True
        self.query_one(QueuePanel).focus()

    def action_focus_tree(self) -> None:
        panels = self.query_one("#panels")
        if panels.has_class("narrow") and panels.has_class("outputs"):
            panels.remove_class("outputs")
        self.auto_outputs = False
        self.query_one(NodeTree).focus()

    def action_focus_queue(self) -> None:
        panels = self.query_one("#panels")
        if panels.has_class("narrow") and not panels.has_class("outputs"):
            panels.add_class("outputs")
        self.query_one(QueuePanel).focus()

    def action_switch_panels(self) -> None:
        panels = self.query_one("#panels")
        panels.toggle_class("outputs")
        self.auto_outputs = False
        if panels.has_class("narrow"):  # focus follows the panels shown: keys never go to a hidden widget
            (self.query_one(QueuePanel) if panels.has_class("outputs") else self.query_one(NodeTree)).focus()

    def action_history(self) -> None:
        from tui_diffusion.screens.history import HistoryScreen
        from tui_diffusion.store.history import StoreError

        try:
            history = self.app.bridge.open_history()
        except (StoreError, OSError) as exc:
            self.notify(f"no history: {exc}", severity="error")
            return
        if history.notice:
            self.notify(history.notice, severity="warning", timeout=10)

        async def reopened(workflow: Any) -> None:
            if workflow:
                self._confirm_discard(lambda: self.call_later(self._open_data, workflow))

        self.app.push_screen(HistoryScreen(history), reopened)

    async def _open_data(self, data: dict[str, Any]) -> None:
        self.document = WorkflowDocument(Workflow.from_data(data, "history"), None)
        self.node_status = {}
        self.selected_node = next((n for n in self.document.workflow
                                   if self.document.workflow.class_type(n) == "KSampler"), None)
        await self.refresh_all(select=True)
        self.notify("opened the job's workflow (unsaved)")

    def action_graph(self) -> None:
        """The graph view over the current workflow; the node chosen there (enter) becomes the selected one."""
        from tui_diffusion.screens.graph import GraphScreen

        if isinstance(self.app.screen, GraphScreen):  # from the palette while it is open
            return

        def running() -> str | None:
            job = self.book.running()
            return job.node_id if job is not None else None

        async def chosen(node_id: str | None) -> None:
            if node_id is not None and node_id in self.document.workflow:
                self.selected_node = node_id
                await self.refresh_all(select=True)

        self.app.push_screen(GraphScreen(self.document, self.selected_node, running), chosen)

    def action_help(self) -> None:
        from tui_diffusion.screens.help import HelpScreen  # Markdown loads when help is first asked for

        self.app.push_screen(HelpScreen())

    def action_full_view(self) -> None:
        pane = self.query_one(ImagePane)
        if pane.path is None:
            self.notify("no finished image to view yet", severity="warning")
            return
        self.app.full_view(pane.path)

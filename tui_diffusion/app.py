"""The terminal app: wires settings, the main screen and the worker bridge. Work lives elsewhere."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive

from tui_diffusion.bridge import EngineBridge
from tui_diffusion.catalogue import resolve_workflow, shipped_workflows_dir
from tui_diffusion.document import WorkflowDocument
from tui_diffusion.graph.workflow import Workflow, WorkflowError
from tui_diffusion.paths import ModelPaths
from tui_diffusion.settings import WorkerConfig
from tui_diffusion.state import load_state, save_state
from tui_diffusion.text import printable

#: the exit code after UI code raised (the crash handler kept the workflow and logged the traceback)
CRASH_EXIT_CODE = 1
#: seconds a hung-up app may take to shut down before it is ended
HANG_UP_GRACE_S = 5.0


class TuiDiffusionApp(App):
    TITLE = "tui-diffusion"
    BINDINGS = [Binding("ctrl+q", "quit_app", "Quit", priority=True)]

    worker_state: reactive[str] = reactive("starting…")
    #: the pid of the background server this app is attached to, if it is
    attached_to: reactive[int | None] = reactive(None)

    def __init__(self, workflow_path: Path | None, config: WorkerConfig,
                 client_factory: Callable[[WorkerConfig], Any] | None = None,
                 exit_after_first_frame: bool = False, workflows_dir: Path | None = None,
                 theme: str | None = None) -> None:
        from multiprocessing import resource_tracker

        # Start multiprocessing's helper while stderr is still the terminal's: once Textual runs it
        # is not a real file descriptor, and the helper could not be spawned then.
        resource_tracker.ensure_running()
        super().__init__()
        self.config = config
        self.models = ModelPaths(config.models_dir, config.input_dir, tuple(config.extra_model_paths))
        self.workflows_dir = workflows_dir or Path("workflows")
        if theme:
            self.theme = theme
        self.default_workflow = self._default_workflow()
        self.document, self.open_error = self._open_initial(workflow_path)
        # the worker loads the open workflow's checkpoint once it is ready, while the user reads the workflow
        config = dataclasses.replace(config, preload=checkpoints_of(self.document.workflow.to_data()))
        kwargs = {"factory": client_factory} if client_factory else {}
        self.bridge = EngineBridge(self.post_to_screen, config, **kwargs)
        self._exit_after_first_frame = exit_after_first_frame
        self.first_frame_at: float | None = None
        self.main_screen: Any = None
        #: UI code raised and the crash handler ran: ``run_tui`` then exits non-zero
        self.crashed = False

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every toast (widgets' and screens' notify land here): names from files and workflows in it are
        shown with control characters escaped, never sent to the terminal raw."""
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().notify(printable(message, keep_newlines=True), title=printable(title), severity=severity,
                       markup=markup, **kwargs)

    # -- start-up -------------------------------------------------------------------------------------------
    def _default_workflow(self) -> Path:
        local = Path("workflows") / "txt2img.json"
        return local if local.is_file() else shipped_workflows_dir() / "txt2img.json"

    def workflow_folders(self) -> list[Path]:
        """Where the open dialog lists workflows: ./workflows, the configured folder, the shipped ones."""
        return [Path("workflows"), self.workflows_dir, shipped_workflows_dir()]

    def workflow_path(self, text: str) -> Path:
        """What the open dialog's typed answer means: a path, or a shipped workflow's name."""
        try:
            return resolve_workflow(Path(text).expanduser())
        except WorkflowError:
            return Path(text).expanduser()  # opening it then says what is wrong

    def _open_initial(self, path: Path | None) -> tuple[WorkflowDocument, str | None]:
        candidates: list[Path] = []
        if path:
            try:  # a file, or a shipped workflow's name
                candidates.append(resolve_workflow(path))
            except WorkflowError as exc:
                return WorkflowDocument(Workflow.load(self.default_workflow), None), str(exc)
        last = load_state().get("last_workflow")
        if path is None and last:
            candidates.append(Path(last))
        error = None
        for candidate in candidates:
            try:
                return WorkflowDocument.open(candidate), None
            except WorkflowError as exc:
                error = str(exc)
        return WorkflowDocument(Workflow.load(self.default_workflow), None), error

    def get_default_screen(self) -> Any:
        """The main screen is the bottom of the stack itself: no empty screen under it to lay out and resize."""
        from tui_diffusion.screens.main import MainScreen

        self.main_screen = MainScreen(self.document)
        return self.main_screen

    def on_mount(self) -> None:
        self.update_title()
        if self.open_error:
            self.notify(self.open_error, severity="error", timeout=10)
        if self.document.notice:
            self.notify(self.document.notice, severity="warning", timeout=15)
        self.call_after_refresh(self._first_frame)
        import asyncio
        import signal

        try:  # a dropped SSH connection: keep the edits, leave the jobs to the worker or server, and go
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.hang_up)
        except (NotImplementedError, RuntimeError, AttributeError):  # no SIGHUP here (Windows)
            pass
        state = load_state()
        recovered = state.pop("recovered", None)
        if recovered:
            save_state(state)
            self.notify(f"unsaved edits from a session whose terminal went away were kept in {recovered}",
                        severity="warning", timeout=15)

    def hang_up(self) -> None:
        """SIGHUP: the terminal is gone. Unsaved edits go to a recovery file; queued jobs are in the store
        (an embedded worker finishes nothing more, they are held for the next start) or on the server."""
        from tui_diffusion.state import save_recovery

        screen = self._main()
        doc = screen.document if screen else self.document
        if doc.dirty:
            save_recovery(doc.name, doc.workflow.to_data())
        self.exit(return_code=129)
        if not self.is_headless:
            # Textual's shutdown writes to the terminal that is gone, and such a write was seen to block for
            # good: the process ends anyway (the worker sees its parent go, jobs stay held in the store).
            import threading

            watchdog = threading.Timer(HANG_UP_GRACE_S, os._exit, args=(129,))
            watchdog.daemon = True
            watchdog.start()

    def _first_frame(self) -> None:
        self.first_frame_at = time.time()  # wall clock: the benchmark compares it with the launch time
        if self.main_screen is not None:
            self.main_screen.first_frame_drawn()
        # the worker starts once the first frame is up: spawning it earlier competes with that frame
        self.bridge.start()
        self._read_ahead()
        if self._exit_after_first_frame:
            self.exit(self.first_frame_at)

    def _read_ahead(self) -> None:
        """The open workflow's model files are read into the page cache while the worker starts (a checkpoint
        not read since the boot comes from the disk meanwhile, not after torch is imported)."""
        from tui_diffusion.modelfiles.readahead import read_ahead, workflow_model_files

        try:
            read_ahead(workflow_model_files(self.document.workflow, self.models))
        except Exception:  # a hint only: never in the way of the app
            pass

    def post_to_screen(self, message: Any) -> None:
        """Deliver a bridge message to the main screen; thread-safe (post_message is)."""
        if self.main_screen is not None:
            self.main_screen.post_message(message)

    # -- state shown in the header ---------------------------------------------------------------------------
    def watch_worker_state(self, state: str) -> None:
        self.update_title()

    def watch_attached_to(self, pid: int | None) -> None:
        self.update_title()

    def update_title(self) -> None:
        screen = self._main()
        doc = screen.document if screen else self.document
        mark = " •" if doc.dirty else ""
        issues = len(screen.issues) if screen else 0
        self.title = f"{doc.name}{mark}"
        where = f" · attached to server {self.attached_to}" if self.attached_to else ""
        self.sub_title = f"worker {self.worker_state}{where}" + (f" · {issues} problem(s)" if issues else "")

    def _main(self) -> Any:
        return self.main_screen

    def remember(self, path: Path) -> None:
        state = load_state()
        state["last_workflow"] = str(path.resolve())
        save_state(state)

    # -- actions ------------------------------------------------------------------------------------------------
    def full_view(self, path: Path) -> None:
        from tui_diffusion.images import show_full

        try:
            with self.suspend():
                show_full(path)
        except Exception as exc:  # e.g. a terminal that cannot be suspended (tests, Windows)
            self.notify(f"cannot show the full view here: {exc}", severity="warning")

    def action_quit_app(self) -> None:
        screen = self._main()
        if screen is None or not screen.document.dirty:
            self.exit()
            return

        def answered(answer: str | None) -> None:
            if answer == "save":
                screen.action_save()
                if not screen.document.dirty:
                    self.exit()
            elif answer == "discard":
                self.exit()

        from tui_diffusion.screens.dialogs import ConfirmDialog  # not needed before the first frame

        self.push_screen(ConfirmDialog(f"{screen.document.name} has unsaved changes. Quit?",
                                       [("save", "Save and quit"), ("discard", "Quit without saving"),
                                        ("cancel", "Cancel")]), answered)

    def get_system_commands(self, screen: Any):  # noqa: ANN201
        yield from super().get_system_commands(screen)
        main = self._main()
        if main is None:
            return
        for binding in main.BINDINGS:
            if isinstance(binding, Binding) and binding.description:
                action = binding.action
                yield SystemCommand(binding.description, binding.tooltip or binding.description,
                                    lambda a=action: self.call_later(main.run_action, a))
        for label, action in (("Add node", "add"), ("Delete selected node", "delete"), ("Rename node", "rename")):
            yield SystemCommand(label, f"{label} (node tree)",
                                lambda a=action: main.post_message(_tree_request(main, a)))

    def action_command_palette(self) -> None:
        """Textual's palette, made safe to close while its search is still running."""
        from tui_diffusion.screens.dialogs import SafeCommandPalette

        if self.use_command_palette and not SafeCommandPalette.is_open(self):
            self.push_screen(SafeCommandPalette(id="--command-palette"))

    def pop_screen(self) -> Any:
        """Never the main screen: a key queued behind the one that closed the command palette (or any
        screen that pops itself) would otherwise pop the editor too and leave a blank terminal."""
        if self.main_screen is not None and self.screen is self.main_screen:
            from textual.await_complete import AwaitComplete

            return AwaitComplete.nothing()
        return super().pop_screen()

    def _fatal_error(self) -> None:
        """A bug in UI code (Textual then exits): keep the workflow and the traceback in files and say where,
        rather than drawing a traceback over the terminal."""
        from tui_diffusion.crash import crash_report

        screen = self._main()
        self.crashed = True
        self.bell()
        self._exit_renderables.append(crash_report(screen.document if screen else self.document, self._exception))
        self._close_messages_no_wait()

    async def on_unmount(self) -> None:
        self.bridge.close()


def checkpoints_of(data: dict[str, Any]) -> tuple[str, ...]:
    """The checkpoint names a workflow's CheckpointLoaderSimple nodes load (in node order, each once)."""
    names: list[str] = []
    for node in data.values():
        if not isinstance(node, dict):
            continue
        name = (node.get("inputs") or {}).get("ckpt_name")
        if node.get("class_type") == "CheckpointLoaderSimple" and isinstance(name, str) and name not in names:
            names.append(name)
    return tuple(names)


def _tree_request(main: Any, action: str) -> Any:
    from tui_diffusion.widgets.node_tree import NodeTree

    return NodeTree.Requested(action, main.selected_node)


def run_tui(workflow: Path | None, config: WorkerConfig, settings: dict[str, Any] | None = None,
            client_factory: Callable[[WorkerConfig], Any] | None = None) -> int:
    exit_after = os.environ.get("TUI_DIFFUSION_EXIT_AFTER_FIRST_FRAME") == "1"
    config = dataclasses.replace(config, log_to_file_only=True)
    settings = settings or {}
    app = TuiDiffusionApp(workflow, config, client_factory, exit_after_first_frame=exit_after,
                          workflows_dir=settings.get("workflows_dir"), theme=settings.get("theme"))
    result = app.run()
    if exit_after and isinstance(result, float):
        print(f"first frame at {result:.6f}")
    code = app.return_code or 0  # 129 after a hang-up (hang_up sets it), 0 after a normal quit
    if app.crashed:  # the traceback is in a crash log: say so to scripts and shells too
        return code or CRASH_EXIT_CODE
    return code

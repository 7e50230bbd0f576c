"""Small modal screens: pickers, prompts and confirmations. Each returns its answer with dismiss()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.await_complete import AwaitComplete
from textual.binding import Binding
from textual.command import CommandPalette
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

from tui_diffusion.text import printable
from tui_diffusion.widgets.keys import OrderedInput

_CSS = """
Dialog { align: center middle; }
Dialog > Vertical { width: 70; max-width: 100%; height: auto; max-height: 90%; border: round $accent;
                    background: $surface; padding: 0 1; }
Dialog OptionList { height: auto; max-height: 16; }
Dialog Horizontal { height: auto; }
Dialog .title { text-style: bold; margin-bottom: 1; }
"""


class DismissOnce:
    """A screen that closes once. ``Screen.dismiss`` pops whatever screen is on top, so a key queued behind
    the one that closed a dialog (escape, enter typed fast, or a loaded machine) would close the main screen
    under it and leave a blank terminal; later calls do nothing here."""

    def dismiss(self, result: Any = None) -> AwaitComplete:
        if getattr(self, "_dismissed", False) or self.app.screen is not self:  # type: ignore[attr-defined]
            return AwaitComplete.nothing()
        self._dismissed = True
        return super().dismiss(result)  # type: ignore[misc]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys that reach a closing screen do nothing (its widgets may already be gone)."""
        if getattr(self, "_dismissed", False):
            return False
        return super().check_action(action, parameters)  # type: ignore[misc]


class Dialog(DismissOnce, ModalScreen):
    DEFAULT_CSS = _CSS
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceDialog(Dialog):
    """Pick one of several options (node types, link sources); typing filters the list."""

    BINDINGS = [Binding("down", "into_list", show=False)]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.options = options

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield OrderedInput(placeholder="type to filter, enter to choose, down to browse")
            yield OptionList(*self._matching(""))

    def _matching(self, text: str) -> list[Option]:
        words = text.lower().split()
        return [Option(Text(printable(label)), id=value) for value, label in self.options
                if all(w in f"{value} {label}".lower() for w in words)]

    @on(Input.Changed)
    def _filter(self, event: Input.Changed) -> None:
        if not (found := self.query(OptionList)):
            return  # closing: its widgets are going
        options = found.first()
        options.clear_options()
        options.add_options(self._matching(event.value))
        options.highlighted = 0 if options.option_count else None

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        if not (found := self.query(OptionList)):
            return
        options = found.first()
        if options.option_count:
            index = options.highlighted if options.highlighted is not None else 0
            self.dismiss(options.get_option_at_index(index).id)

    def action_into_list(self) -> None:
        for options in self.query(OptionList):
            options.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class PromptDialog(Dialog):
    """Ask for one line of text (a file name, a title, a count)."""

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield OrderedInput(self.value, placeholder=self.placeholder)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class OpenDialog(Dialog):
    """Open a workflow: pick one from the workflows folder or type any path."""

    BINDINGS = [Binding("down", "into_list", show=False)]

    def __init__(self, folders: list[Path]) -> None:
        super().__init__()
        self.files = sorted({p for folder in folders if folder.is_dir() for p in folder.glob("*.json")})

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Open workflow (type a path, or pick one)", classes="title")
            yield OrderedInput(placeholder="path/to/workflow.json")
            # file names from disk: control characters escaped, brackets never read as markup
            yield OptionList(*[Option(Text(printable(p)), id=str(p)) for p in self.files])

    @on(Input.Submitted)
    def _typed(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_into_list(self) -> None:
        """``down`` from the path field goes to the list (as in the node type picker)."""
        for options in self.query(OptionList):
            options.focus()

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ConfirmDialog(Dialog):
    """A question with a few buttons; answers the id of the pressed one."""

    def __init__(self, question: str, answers: list[tuple[str, str]]) -> None:
        super().__init__()
        self.question = question
        self.answers = answers

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="title")
            with Horizontal():
                for answer_id, label in self.answers:
                    yield Button(label, id=answer_id)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)


class SafeCommandPalette(CommandPalette):
    """Textual's command palette, tolerant of work that outlives it. Its search runs in a worker and its
    timers and watchers look up its own widgets; when keys close it while these are under way (fast typing, a
    loaded machine) they find the widgets gone, which would end the app. Once closed, that is ignored."""

    def _gone(self) -> bool:
        return self not in self.app.screen_stack

    async def _on_message(self, message: Message) -> None:
        try:
            await super()._on_message(message)
        except NoMatches:
            if not self._gone():
                raise

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if self._gone():
            return False
        return super().check_action(action, parameters)

    @work(exclusive=True, group=CommandPalette._GATHER_COMMANDS_GROUP, exit_on_error=False)
    async def _gather_commands(self, search_value: str) -> None:
        if self._gone():
            return
        try:
            await CommandPalette._gather_commands.__wrapped__(self, search_value)  # the search itself, unchanged
        except NoMatches:
            if not self._gone():
                raise

"""Type-to-jump: a one-line search under the node tree. Each keystroke moves the tree's cursor to the best
match (title, type or id); up/down step through the matches, enter keeps the place, escape goes back."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input

from tui_diffusion.widgets.keys import OrderedInput


class JumpBar(OrderedInput):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", show=False),
        Binding("down,tab", "step(1)", "Next match", show=False),
        Binding("up,shift+tab", "step(-1)", "Previous match", show=False),
    ]

    class Search(Message):
        def __init__(self, query: str, index: int) -> None:
            super().__init__()
            self.query = query
            self.index = index

    class Done(Message):
        def __init__(self, accepted: bool) -> None:
            super().__init__()
            self.accepted = accepted

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(placeholder="jump to: title, type or id", compact=True, id=id)
        self.index = 0

    def open(self) -> None:
        self.index = 0
        self.value = ""
        self.display = True
        self.focus()

    def close(self) -> None:
        self.display = False

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.index = 0
        self.post_message(self.Search(self.value, 0))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Done(True))

    def action_step(self, delta: int) -> None:
        self.index += delta
        self.post_message(self.Search(self.value, self.index))

    def action_cancel(self) -> None:
        self.post_message(self.Done(False))

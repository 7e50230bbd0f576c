"""Text fields whose editing keys take effect in the order they were typed.

Textual inserts a printable character in the focused field's own key handler, but runs a non-priority
binding (``backspace``, ``end``, ``left``, ``ctrl+w``...) only once the key event has bubbled through every
ancestor's message queue up to the app. While an ancestor is busy (the screen revalidating the workflow and
relabelling the tree after the previous keystroke), the next characters overtake the editing keys typed
before them: "end, backspace x3, 8, 0" typed fast into a field holding 512 left it empty with "80" sent to
the document. Running the field's own bindings in its key handler keeps every key in order; keys the field
does not bind still bubble to the screen and the app as before.
"""

from __future__ import annotations

from typing import Any

from textual import events
from textual.widgets import Input, TextArea


class KeysInOrder:
    """Mixin for an editor widget: its own bindings run as its key arrives, like the characters it types."""

    async def _on_key(self, event: events.Key) -> None:
        widget: Any = self
        focused = widget.screen.focused
        if focused is not None and focused is not widget:
            # read by the app before an earlier key (tab, escape) moved the focus: the key is the focused one's
            event.stop()
            event.prevent_default()
            again = events.Key(event.key, event.character)
            again.set_sender(widget.app)
            focused._forward_event(again)
            return
        await super()._on_key(event)  # type: ignore[misc]
        if event._stop_propagation or event._no_default_action:
            return
        # the bindings Textual would run once the key reached the app, from this field up (its own editing keys,
        # then tab, escape...): run now, so a key that moves the focus has moved it before the next key
        if await widget.app._check_bindings(event.key):
            event.stop()
            event.prevent_default()


class OrderedInput(KeysInOrder, Input):
    """An Input whose editing keys and characters apply in the order typed."""


class OrderedTextArea(KeysInOrder, TextArea):
    """A TextArea whose editing keys and characters apply in the order typed."""

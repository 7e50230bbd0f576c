"""The prompt editor: a TextArea that edits like an editor (select all, cut/copy/paste, word-wise moves),
highlights ComfyUI's prompt syntax (``(word:1.2)``, ``((word))``, ``embedding:name``) and shows the token
count of each 77-token window under the text."""

from __future__ import annotations

import re
from typing import Any

from rich.style import Style
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Static, TextArea

from tui_diffusion import prompt_tokens
from tui_diffusion.widgets.keys import OrderedTextArea

WEIGHT, EMPHASIS, EMBEDDING = "prompt.weight", "prompt.emphasis", "prompt.embedding"
_STYLES = {WEIGHT: Style(color="yellow", bold=True), EMPHASIS: Style(color="yellow"),
           EMBEDDING: Style(color="magenta", bold=True)}
_WEIGHT_END = re.compile(r":\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*$")
_EMBEDDING = re.compile(r"embedding:[^\s,()]+")


def prompt_highlights(line: str) -> list[tuple[int, int, str]]:
    """Character ranges of one line to highlight: the brackets and ``:weight`` of a weighted group (the
    brackets only for ``((emphasis))``) and each ``embedding:name``. Escaped ``\\(``/``\\)`` are text."""
    out: list[tuple[int, int, str]] = []
    stack: list[int] = []
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\":
            i += 2
            continue
        if char == "(":
            stack.append(i)
        elif char == ")" and stack:
            start = stack.pop()
            inner = line[start + 1:i]
            weight = _WEIGHT_END.search(inner)
            if weight and weight.start() > 0:
                out.append((start, start + 1, WEIGHT))
                out.append((start + 1 + weight.start(), i + 1, WEIGHT))
            else:
                out.append((start, start + 1, EMPHASIS))
                out.append((i, i + 1, EMPHASIS))
        i += 1
    out += [(m.start(), m.end(), EMBEDDING) for m in _EMBEDDING.finditer(line)]
    return out


class PromptEditor(OrderedTextArea):
    """A prompt's TextArea with editor keys. ctrl+x cuts here (the screen's interrupt key defers to it while
    text is selected)."""

    BINDINGS = [
        Binding("ctrl+a", "select_all", "Select all", show=False),
        Binding("shift+delete", "cut", "Cut", show=False),
        Binding("ctrl+insert", "copy", "Copy", show=False),
        Binding("shift+insert", "paste", "Paste", show=False),
        Binding("alt+left,alt+b", "cursor_word_left", "Word left", show=False),
        Binding("alt+right,alt+f", "cursor_word_right", "Word right", show=False),
        Binding("alt+shift+left", "cursor_word_left(True)", "Select word left", show=False),
        Binding("alt+shift+right", "cursor_word_right(True)", "Select word right", show=False),
    ]

    def _build_highlight_map(self) -> None:
        """ComfyUI's prompt syntax instead of a tree-sitter language (TextArea keeps byte offsets per line)."""
        self._line_cache.clear()
        highlights = self._highlights
        highlights.clear()
        for row, line in enumerate(self.document.lines):
            for start, end, name in prompt_highlights(line):
                highlights[row].append((len(line[:start].encode()), len(line[:end].encode()), name))

    def _set_theme(self, theme: str) -> None:
        super()._set_theme(theme)
        self._theme.syntax_styles = {**self._theme.syntax_styles, **_STYLES}  # a copy: the theme is shared


class PromptBox(Vertical):
    """The editor and its token count line."""

    DEFAULT_CSS = """
    PromptBox { height: auto; }
    PromptBox PromptEditor { height: 6; }
    PromptBox .tokens { color: $text-muted; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    PromptBox .tokens.over { color: $warning; }
    """

    def __init__(self, text: str, **kwargs: Any) -> None:
        super().__init__()
        self._text = text
        self._editor_kwargs = kwargs

    def compose(self) -> ComposeResult:
        yield PromptEditor(self._text, soft_wrap=True, tab_behavior="focus", **self._editor_kwargs)
        yield Static("tokens: …", classes="tokens")

    def on_mount(self) -> None:
        if prompt_tokens.loaded():
            self.update_count()
        else:
            self._load_tokenizer()

    @work(thread=True, exclusive=True, group="tokenizer", exit_on_error=False)
    def _load_tokenizer(self) -> None:
        prompt_tokens.load()
        self.app.call_from_thread(self.update_count)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self.update_count()

    def update_count(self) -> None:
        editors, lines = self.query(PromptEditor), self.query(".tokens").results(Static)
        line = next(lines, None)
        if not editors or line is None or not prompt_tokens.loaded():
            return  # not composed yet, or being removed: nothing to count into
        text = editors.first().text
        try:
            counts = prompt_tokens.chunk_counts(text)
        except Exception as exc:  # a counting problem must never cost the user their typing
            line.update(f"tokens: cannot count ({exc})")
            return
        line.update(prompt_tokens.describe_counts(counts, prompt_tokens.EMBEDDING_PREFIX in text))
        line.set_class(len(counts) > 1, "over")

"""The image pane: the selected job's output or live preview, in half-blocks, refitted on resize."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui_diffusion.images import halfblock_ansi, open_image

if TYPE_CHECKING:
    from PIL import Image


class ImagePane(Widget, can_focus=True):
    DEFAULT_CSS = """
    ImagePane { content-align: center middle; }
    """

    caption: reactive[str] = reactive("no image yet: queue a run with ctrl+r")

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.image: Image.Image | None = None
        self.path: Path | None = None
        self._cache: tuple[tuple[int, int, int], Text] | None = None

    def show_file(self, path: str | Path, caption: str) -> None:
        self.path = Path(path)
        self._set(open_image(self.path), caption)

    def show_preview(self, png: bytes, caption: str) -> None:
        self._set(open_image(png), caption)

    def clear(self, caption: str) -> None:
        self.image, self.path, self._cache = None, None, None
        self.caption = caption
        self.refresh()

    def _set(self, image: Image.Image, caption: str) -> None:
        self.image, self._cache = image, None
        self.caption = caption
        self.border_title = caption
        self.refresh()

    def watch_caption(self, caption: str) -> None:
        self.border_title = caption

    def render(self) -> Text:
        if self.image is None:
            return Text(self.caption, style="dim")
        key = (self.size.width, self.size.height, id(self.image))
        if self._cache is None or self._cache[0] != key:
            ansi = halfblock_ansi(self.image, self.size.width, self.size.height)
            self._cache = (key, Text.from_ansi(ansi, no_wrap=True, end=""))
        return self._cache[1]

    def on_resize(self) -> None:
        self._cache = None
        self.refresh()

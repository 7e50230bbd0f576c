"""The image pane: the selected job's output or live preview, in half-blocks, refitted on resize."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui_diffusion.images import ImageFileError, halfblock_ansi, open_image
from tui_diffusion.text import printable

if TYPE_CHECKING:
    from PIL import Image

#: the outputs the pane can draw; others (SaveLatent's ``.latent``, a future video) are skipped when choosing
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_file(path: str | Path) -> bool:
    """Whether an output is an image by its name (nothing is read: the file may be large or gone)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def latest_image(paths: list[str] | list[Path]) -> Path | None:
    """The last image among a job's outputs, or None when it made none (a latent, nothing at all)."""
    return next((Path(p) for p in reversed(paths) if is_image_file(p)), None)


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

    def show_file(self, path: str | Path, caption: str) -> bool:
        """Draw an output file; one that is gone, not an image or too large to decode is a short message in
        the pane instead (an output on disk is not ours: the user may delete or replace it any time)."""
        path = Path(path)
        name = printable(path.name)
        try:
            image = open_image(path)
        except FileNotFoundError:
            why = f"{name} no longer exists"
        except IsADirectoryError:
            why = f"{name} is a folder, not an image"
        except OSError as exc:
            why = f"cannot read {name}: {printable(exc.strerror or exc)}"
        except ImageFileError as exc:
            why = f"cannot show {name}: {printable(exc)}"
        else:
            self.path = path
            self._set(image, printable(caption))
            return True
        self.clear(why)
        return False

    def show_preview(self, png: bytes, caption: str) -> bool:
        """Draw a live preview; undecodable bytes leave a message instead of ending the app."""
        try:
            image = open_image(png)
        except (ImageFileError, OSError) as exc:
            self.clear(f"cannot show the preview: {printable(exc)}")
            return False
        self._set(image, printable(caption))
        return True

    def clear(self, caption: str) -> None:
        self.image, self.path, self._cache = None, None, None
        self.caption = printable(caption)
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

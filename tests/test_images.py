"""Drawing with term-image: half-blocks in the app, and the protocol chosen for the full view."""

from __future__ import annotations

import subprocess

import pytest
from PIL import Image
from rich.text import Text

from tui_diffusion import images

BlockImage = images._term_image().image.BlockImage


def test_halfblocks_fit_the_cells_and_keep_colours() -> None:
    image = Image.new("RGB", (64, 32), (250, 10, 10))
    image.paste((10, 10, 250), (0, 16, 64, 32))  # bottom half blue
    ansi = images.halfblock_ansi(image, columns=20, rows=20)
    text = Text.from_ansi(ansi)
    lines = text.plain.splitlines()
    assert len(lines) == 5 and all(len(line) == 20 for line in lines)  # 2:1 image into 20 columns
    assert set(text.plain.replace("\n", "")) <= {"▀", "▄", " "}
    assert "2;250;10;10m" in ansi and "2;10;10;250m" in ansi  # true colour, both halves


def test_refit_on_resize_changes_the_size() -> None:
    image = Image.new("RGB", (64, 64), (0, 200, 0))
    small = Text.from_ansi(images.halfblock_ansi(image, 10, 10)).plain.splitlines()
    large = Text.from_ansi(images.halfblock_ansi(image, 40, 40)).plain.splitlines()
    assert len(small[0]) == 10 and len(large[0]) == 40


def test_inside_tmux_without_passthrough_the_full_view_uses_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    monkeypatch.setattr(images.shutil, "which", lambda name: "/usr/bin/tmux")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "off\n", ""))
    assert not images.tmux_passthrough_allowed()
    assert images.full_view_class() is BlockImage


def test_inside_tmux_with_passthrough_the_terminal_protocol_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    monkeypatch.setattr(images.shutil, "which", lambda name: "/usr/bin/tmux")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "on\n", ""))
    assert images.tmux_passthrough_allowed()
    kitty = images._term_image().image.KittyImage
    monkeypatch.setattr(images._term_image().image, "auto_image_class", lambda: kitty)
    assert images.full_view_class() is kitty

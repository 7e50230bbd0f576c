"""The floor of the start-up figure: a bare Textual app (header, a tree, a footer) up to its first frame.

Run in the same pseudo-terminal and the same run as the app, it says how much of the app's first frame is
Python and Textual on this machine and how much is ours. Prints ``first frame at <wall clock>`` like the app.
"""

from __future__ import annotations

import time

from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, Tree


class Bare(App):
    def compose(self) -> ComposeResult:
        yield Header()
        tree: Tree[None] = Tree("workflow")
        for i in range(8):
            tree.root.add_leaf(f"node {i}")
        tree.root.expand()
        yield tree
        yield Footer()

    def on_mount(self) -> None:
        self.call_after_refresh(lambda: self.exit(time.time()))


if __name__ == "__main__":
    print(f"first frame at {Bare().run():.6f}")

"""The graph screen: the whole workflow as boxes and lines; ``enter`` goes back with the chosen node.

Dismissed with the chosen node's id (``enter``), or None (``escape``, or ``f5``: the key that opens it). The
running node comes as an id, or as a callable the screen polls so the highlight follows a job.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from tui_diffusion.document import WorkflowDocument
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.text import printable
from tui_diffusion.widgets.graph_view import GraphView

RunningNode = str | None | Callable[[], str | None]
POLL_SECONDS = 0.25


class GraphScreen(Screen[str | None]):
    DEFAULT_CSS = """
    GraphScreen #graph { height: 1fr; }
    GraphScreen #graph-info {
        height: 2; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis;
    }
    """

    BINDINGS = [
        Binding("escape,f5", "close", "Close", tooltip="Back to the editor, selection unchanged"),
    ]

    def __init__(self, document: WorkflowDocument | Workflow, selected: str | None = None,
                 running: RunningNode = None) -> None:
        super().__init__()
        self.workflow = document.workflow if isinstance(document, WorkflowDocument) else document
        self._running_source = running if callable(running) else None
        self._initial = (selected, None if callable(running) else running)

    def compose(self) -> ComposeResult:
        selected, running = self._initial
        if self._running_source is not None:
            running = self._running_source()
        yield Header()
        yield GraphView(self.workflow, selected, running, id="graph")
        yield Static(id="graph-info")
        yield Footer()

    @property
    def view(self) -> GraphView:
        return self.query_one(GraphView)

    def on_mount(self) -> None:
        self.view.focus()
        self._describe(self.view.selected)
        if self._running_source is not None:
            self.set_interval(POLL_SECONDS, self._poll_running)

    def _poll_running(self) -> None:
        if self._running_source is not None:
            self.view.running = self._running_source()

    @on(GraphView.SelectionChanged)
    def _selection_changed(self, event: GraphView.SelectionChanged) -> None:
        self._describe(event.node_id)

    @on(GraphView.NodeChosen)
    def _chosen(self, event: GraphView.NodeChosen) -> None:
        self.dismiss(event.node_id)

    def action_close(self) -> None:
        self.dismiss(None)

    def _describe(self, node_id: str | None) -> None:
        """Two lines about the selected node: what it is, and where its inputs come from and outputs go."""
        info = self.query_one("#graph-info", Static)
        wf = self.workflow
        if node_id is None or node_id not in wf:
            info.update(Text("empty workflow", style="dim"))
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{printable(node_id)} ", style="dim")  # ids, titles and types come from the file
        text.append(printable(wf.title(node_id)), style="bold")
        text.append(f"  {printable(wf.class_type(node_id))}", style="italic")
        text.append("   arrows move · enter open · esc close · shift+arrows pan", style="dim")
        text.append("\n")
        sources = [f"{printable(name)} ← {printable(link.node_id)}" for name, link in wf.links(node_id).items()]
        users = sorted({n for n in wf if any(link.node_id == node_id for link in wf.links(n).values())},
                       key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
        text.append("inputs: ", style="dim")
        text.append(", ".join(sources) or "none")
        text.append("   feeds: ", style="dim")
        text.append(", ".join(printable(u) for u in users) or "nothing")
        info.update(text)

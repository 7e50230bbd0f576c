"""The workflow as a tree: nodes with their inputs; links shown as "from <title>.<output>"."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from tui_diffusion.document import WorkflowDocument
from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.validate import ValidationIssue
from tui_diffusion.graph.workflow import as_link


@dataclass(frozen=True)
class NodeStatus:
    """How a node fared in the last job of this workflow."""

    state: str  # "executing", "executed", "cached", "failed"
    seconds: float | None = None


def _short(value: object, width: int = 40) -> str:
    text = repr(value) if not isinstance(value, str) else value.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


class NodeTree(Tree[tuple[str, str | None]]):
    BINDINGS = [
        Binding("a", "add_node", "Add node", tooltip="Add a node of a chosen type"),
        Binding("delete,x", "delete_node", "Delete node", tooltip="Delete the selected node and its links"),
        Binding("r", "rename_node", "Rename", show=False, tooltip="Rename the selected node"),
    ]

    class NodeSelected(Message):
        def __init__(self, node_id: str, input_name: str | None) -> None:
            super().__init__()
            self.node_id = node_id
            self.input_name = input_name

    class Requested(Message):
        """The user asked for an edit of the graph (handled by the screen)."""

        def __init__(self, action: str, node_id: str | None) -> None:
            super().__init__()
            self.action = action
            self.node_id = node_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("workflow", id=id)
        self.show_root = False
        self.guide_depth = 2

    def selected_node_id(self) -> str | None:
        node = self.cursor_node
        return node.data[0] if node is not None and node.data else None

    def show(self, doc: WorkflowDocument, issues: list[ValidationIssue],
             status: dict[str, NodeStatus], select: str | None = None) -> None:
        keep = select or self.selected_node_id()
        by_node: dict[str, list[ValidationIssue]] = {}
        for issue in issues:
            by_node.setdefault(issue.node_id or "", []).append(issue)
        self.clear()
        wf = doc.workflow
        cursor_line = 0
        for node_id in wf:
            spec = get_spec(wf.class_type(node_id))
            label = Text()
            node_issues = by_node.get(node_id, [])
            st = status.get(node_id)
            if node_issues:
                label.append("! ", style="bold red")
            elif st and st.state == "executing":
                label.append("» ", style="bold yellow")
            elif spec and spec.output_node:
                label.append("◆ ", style="bold cyan")
            else:
                label.append("  ")
            label.append(f"{node_id} ", style="dim")
            label.append(wf.title(node_id), style="bold")
            if st and st.state in ("executed", "cached", "failed"):
                style = {"executed": "green", "cached": "blue", "failed": "red"}[st.state]
                timing = f" {st.seconds:.2f}s" if st.seconds is not None else ""
                label.append(f" · {st.state}{timing}", style=style)
            if wf.title(node_id) != wf.class_type(node_id):
                label.append(f" ({wf.class_type(node_id)})", style="dim")
            branch: TreeNode = self.root.add(label, data=(node_id, None), expand=node_id == keep)
            if node_id == keep:
                cursor_line = branch.line if branch.line >= 0 else cursor_line
            bad_inputs = {i.input for i in node_issues}
            names = [i.name for i in spec.inputs] if spec else list(wf.inputs(node_id))
            for name in names:
                value = wf.inputs(node_id).get(name, None)
                link = as_link(value)
                shown = doc.link_label(link) if link else ("—" if name not in wf.inputs(node_id) else _short(value))
                leaf = Text()
                leaf.append(f"{name}: ", style="red" if name in bad_inputs else "")
                leaf.append(shown, style="italic cyan" if link else "")
                branch.add_leaf(leaf, data=(node_id, name))
        self.root.expand()
        if keep is not None:
            self.call_after_refresh(self._move_to, keep)

    def _move_to(self, node_id: str) -> None:
        for child in self.root.children:
            if child.data and child.data[0] == node_id:
                self.move_cursor(child)
                return

    class EditRequested(Message):
        """Enter on an input: edit it in the form."""

        def __init__(self, node_id: str, input_name: str) -> None:
            super().__init__()
            self.node_id = node_id
            self.input_name = input_name

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        if event.node.data and event.node.data[1] is not None:
            self.post_message(self.EditRequested(*event.node.data))

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        if event.node.data:
            node_id, name = event.node.data
            if name is None:
                self._accordion(event.node)
            self.post_message(self.NodeSelected(node_id, name))

    def _accordion(self, node: TreeNode) -> None:
        """Show the inputs of the highlighted node only: moving down then walks into them."""
        if node.is_expanded and all(not c.is_expanded for c in self.root.children if c is not node):
            return
        for child in self.root.children:
            if child is not node and child.is_expanded:
                child.collapse()
        node.expand()
        self.call_after_refresh(self.move_cursor, node)

    def action_add_node(self) -> None:
        self.post_message(self.Requested("add", self.selected_node_id()))

    def action_delete_node(self) -> None:
        if self.selected_node_id() is not None:
            self.post_message(self.Requested("delete", self.selected_node_id()))

    def action_rename_node(self) -> None:
        if self.selected_node_id() is not None:
            self.post_message(self.Requested("rename", self.selected_node_id()))

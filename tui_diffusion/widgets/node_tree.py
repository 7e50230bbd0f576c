"""The workflow as a tree: the UI file's groups as levels, nodes with their inputs, links shown as
"from <title>.<output>".

The tree is built once per workflow shape (which nodes, in which groups, with which inputs) and otherwise
updated in place with ``TreeNode.set_label``: a keystroke in the form or a worker event changes a label, it
never clears the tree under the cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from tui_diffusion.document import WorkflowDocument
from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.validate import ValidationIssue
from tui_diffusion.graph.workflow import as_link
from tui_diffusion.text import printable

#: tree data: ("node", node id, input name or None) or ("group", path, None)
Data = tuple[str, Any, Any]


@dataclass(frozen=True)
class NodeStatus:
    """How a node fared in the last job of this workflow."""

    state: str  # "executing", "executed", "cached", "failed"
    seconds: float | None = None


def _short(value: object, width: int = 40) -> str:
    text = repr(value) if not isinstance(value, str) else value.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def input_names(doc: WorkflowDocument, node_id: str) -> list[str]:
    """The inputs a node shows: its spec's, in declared order (or the file's, for an unknown type)."""
    spec = get_spec(doc.workflow.class_type(node_id))
    return [i.name for i in spec.inputs] if spec else list(doc.workflow.inputs(node_id))


def find_nodes(doc: WorkflowDocument, query: str) -> list[str]:
    """Nodes matching a type-to-jump query, best first: the id itself, then titles, then class names
    (a title or class that starts with the query before one that merely contains it)."""
    q = query.strip().lower()
    if not q:
        return []
    wf = doc.workflow
    ranked: list[tuple[int, int, str]] = []
    for order, node_id in enumerate(wf):
        title, kind = wf.title(node_id).lower(), wf.class_type(node_id).lower()
        if node_id.lower() == q:
            rank = 0
        elif title.startswith(q):
            rank = 1
        elif q in title:
            rank = 2
        elif kind.startswith(q):
            rank = 3
        elif q in kind:
            rank = 4
        elif node_id.lower().startswith(q):
            rank = 5
        else:
            continue
        ranked.append((rank, order, node_id))
    return [node_id for _, _, node_id in sorted(ranked)]


class NodeTree(Tree[Data]):
    BINDINGS = [
        Binding("a", "add_node", "Add node", tooltip="Add a node of a chosen type"),
        Binding("delete,x", "delete_node", "Delete node", show=False,
                tooltip="Delete the selected node and its links"),
        Binding("r", "rename_node", "Rename", show=False, tooltip="Rename the selected node"),
        Binding("right,l", "open_node", "Open", show=False, tooltip="Open the node (again: to its first input)"),
        Binding("left,h", "close_node", "Close", show=False, tooltip="Close the node (again: to its parent)"),
        Binding("slash,ctrl+f", "jump", "Jump", tooltip="Type-to-jump: find a node by title, type or id"),
        Binding("g", "follow_link", "Go to source", show=False,
                tooltip="On a linked input: go to the node its value comes from"),
        Binding("b", "go_back", "Back", show=False, tooltip="Back to where the last 'go to source' started"),
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

    class EditRequested(Message):
        """Enter on an input: edit it in the form."""

        def __init__(self, node_id: str, input_name: str) -> None:
            super().__init__()
            self.node_id = node_id
            self.input_name = input_name

    class JumpRequested(Message):
        """'/' in the tree: the screen opens the jump bar."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("workflow", id=id)
        self.show_root = False
        self.guide_depth = 2
        self.auto_expand = False  # enter edits an input or toggles a node; it does both never
        self._doc: WorkflowDocument | None = None
        self._shape: tuple | None = None
        self._branches: dict[str, TreeNode[Data]] = {}
        self._leaves: dict[tuple[str, str], TreeNode[Data]] = {}
        self._groups: dict[tuple[str, ...], TreeNode[Data]] = {}
        self._labels: dict[int, str] = {}  # tree node id -> the markup last set: unchanged labels are skipped
        self.back_stack: list[tuple[str, str | None]] = []

    # -- queries ----------------------------------------------------------------------------------------------
    def selected_node_id(self) -> str | None:
        node = self.cursor_node
        return node.data[1] if node is not None and node.data and node.data[0] == "node" else None

    def selected_input(self) -> str | None:
        node = self.cursor_node
        return node.data[2] if node is not None and node.data and node.data[0] == "node" else None

    def branch(self, node_id: str) -> TreeNode[Data] | None:
        return self._branches.get(node_id)

    # -- building and updating --------------------------------------------------------------------------------
    @staticmethod
    def shape_of(doc: WorkflowDocument) -> tuple:
        return tuple((doc.group_path(n), n, tuple(input_names(doc, n))) for n in doc.workflow)

    def show(self, doc: WorkflowDocument, issues: list[ValidationIssue],
             status: dict[str, NodeStatus], select: str | None = None) -> None:
        """Bring the tree up to date: labels in place; a rebuild only when the workflow's shape changed."""
        shape = self.shape_of(doc)
        if doc is not self._doc or shape != self._shape:
            self._rebuild(doc, shape, select)
        by_node: dict[str, list[ValidationIssue]] = {}
        for issue in issues:
            by_node.setdefault(issue.node_id or "", []).append(issue)
        for node_id, branch in self._branches.items():
            node_issues = by_node.get(node_id, [])
            self._set_label(branch, self._node_label(doc, node_id, node_issues, status.get(node_id)))
            bad = {i.input for i in node_issues}
            inputs = doc.workflow.inputs(node_id)
            for name in input_names(doc, node_id):
                leaf = self._leaves.get((node_id, name))
                if leaf is None:
                    continue
                value = inputs.get(name, None)
                link = as_link(value)
                shown = doc.link_label(link) if link else ("—" if name not in inputs else _short(value))
                text = Text()
                text.append(f"{name}: ", style="red" if name in bad else "")
                text.append(shown, style="italic cyan" if link else "")
                self._set_label(leaf, text)
        if select is not None and select != self.selected_node_id() and select in self._branches:
            self.jump_to(select)

    def _set_label(self, node: TreeNode[Data], label: Text) -> None:
        key = label.markup
        if self._labels.get(id(node)) != key:
            self._labels[id(node)] = key
            node.set_label(label)

    def _node_label(self, doc: WorkflowDocument, node_id: str, node_issues: list[ValidationIssue],
                    st: NodeStatus | None) -> Text:
        wf = doc.workflow
        spec = get_spec(wf.class_type(node_id))
        label = Text()
        if node_issues:
            label.append("! ", style="bold red")
        elif st and st.state == "executing":
            label.append("» ", style="bold yellow")
        elif spec and spec.output_node:
            label.append("◆ ", style="bold cyan")
        else:
            label.append("  ")
        label.append(f"{printable(node_id)} ", style="dim")
        label.append(wf.title(node_id), style="bold")
        if st and st.state in ("executed", "cached", "failed"):
            style = {"executed": "green", "cached": "blue", "failed": "red"}[st.state]
            timing = f" {st.seconds:.2f}s" if st.seconds is not None else ""
            label.append(f" · {st.state}{timing}", style=style)
        if wf.title(node_id) != wf.class_type(node_id):
            label.append(f" ({printable(wf.class_type(node_id))})", style="dim")
        return label

    def _rebuild(self, doc: WorkflowDocument, shape: tuple, select: str | None) -> None:
        """A new workflow or a new shape (a node added, deleted, regrouped): build the tree again, keeping
        which nodes were open and where the cursor was."""
        same_doc = doc is self._doc
        keep = select or (self.selected_node_id() if same_doc else None)
        keep_input = self.selected_input() if same_doc and keep == self.selected_node_id() else None
        opened = {n for n, b in self._branches.items() if b.is_expanded} if same_doc else set()
        closed_groups = {p for p, g in self._groups.items() if not g.is_expanded} if same_doc else set()
        self._doc, self._shape = doc, shape
        self.clear()
        self._branches, self._leaves, self._groups, self._labels = {}, {}, {}, {}
        for path, node_id, names in shape:
            parent = self.root
            for depth in range(1, len(path) + 1):
                sub = tuple(path[:depth])
                group = self._groups.get(sub)
                if group is None:
                    title = Text()
                    title.append("▣ ", style="bold magenta")
                    title.append(sub[-1], style="bold magenta")
                    group = parent.add(title, data=("group", sub, None), expand=sub not in closed_groups)
                    self._groups[sub] = group
                parent = group
            branch = parent.add(Text(node_id), data=("node", node_id, None),
                                expand=node_id in opened or node_id == keep)
            self._branches[node_id] = branch
            for name in names:
                self._leaves[(node_id, name)] = branch.add_leaf(Text(name), data=("node", node_id, name))
        self.root.expand()
        if keep is not None and keep in self._branches:
            target = self._leaves.get((keep, keep_input)) if keep_input else None
            self._move_to(target or self._branches[keep])

    # -- moving -----------------------------------------------------------------------------------------------
    def _move_to(self, node: TreeNode[Data]) -> None:
        self._tree_lines  # noqa: B018 (lays the lines out now, so the node's line number is current)
        self.move_cursor(node)

    def jump_to(self, node_id: str, input_name: str | None = None) -> bool:
        """Put the cursor on a node (or one of its inputs), opening the groups around it."""
        branch = self._branches.get(node_id)
        if branch is None:
            return False
        parent = branch.parent
        while parent is not None and parent is not self.root:
            parent.expand()
            parent = parent.parent
        target = branch
        if input_name is not None and (leaf := self._leaves.get((node_id, input_name))) is not None:
            branch.expand()
            target = leaf
        self._move_to(target)
        return True

    def action_open_node(self) -> None:
        node = self.cursor_node
        if node is None or not node.allow_expand or not node.children:
            return
        if not node.is_expanded:
            node.expand()
        else:
            self._move_to(node.children[0])

    def action_close_node(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded and node.children:
            node.collapse()
        elif node.parent is not None and node.parent is not self.root:
            self._move_to(node.parent)

    def action_jump(self) -> None:
        self.post_message(self.JumpRequested())

    def action_follow_link(self) -> None:
        node = self.cursor_node
        if self._doc is None or node is None or not node.data or node.data[0] != "node" or node.data[2] is None:
            self.notify("go to source: put the cursor on a linked input", severity="warning")
            return
        node_id, name = node.data[1], node.data[2]
        if node_id not in self._doc.workflow:  # deleted by a key typed just before; the tree catches up
            return
        link = as_link(self._doc.workflow.inputs(node_id).get(name))
        if link is None or link.node_id not in self._branches:
            self.notify(f"{name} is not linked to a node", severity="warning")
            return
        self.back_stack.append((node_id, name))
        self.jump_to(link.node_id)
        self._branches[link.node_id].expand()

    def action_go_back(self) -> None:
        while self.back_stack:
            node_id, name = self.back_stack.pop()
            if self.jump_to(node_id, name):
                return
        self.notify("nothing to go back to")

    # -- events -------------------------------------------------------------------------------------------------
    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        data = event.node.data
        if data and data[0] == "node" and data[2] is not None:
            self.post_message(self.EditRequested(data[1], data[2]))
        elif event.node.allow_expand:
            event.node.toggle()

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        data = event.node.data
        if data and data[0] == "node":
            self.post_message(self.NodeSelected(data[1], data[2]))

    def action_add_node(self) -> None:
        self.post_message(self.Requested("add", self.selected_node_id()))

    def action_delete_node(self) -> None:
        if self.selected_node_id() is not None:
            self.post_message(self.Requested("delete", self.selected_node_id()))

    def action_rename_node(self) -> None:
        if self.selected_node_id() is not None:
            self.post_message(self.Requested("rename", self.selected_node_id()))

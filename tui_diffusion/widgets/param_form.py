"""The parameter form of one node, built from its spec: no node type has a hand-written form."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from rich.markup import escape
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, Static, Switch, TextArea

from tui_diffusion.document import SEED_MODES, WorkflowDocument
from tui_diffusion.graph.specs import BOOLEAN, COMBO, FLOAT, INT, InputSpec, get_spec
from tui_diffusion.graph.validate import ValidationIssue, check_value
from tui_diffusion.graph.values import parse_value
from tui_diffusion.graph.workflow import as_link
from tui_diffusion.paths import ModelPaths
from tui_diffusion.text import printable
from tui_diffusion.widgets.keys import OrderedInput
from tui_diffusion.widgets.prompt_editor import PromptBox


class ValueEdited(Message):
    """A field holds a new valid value (or an invalid one: ``error`` says why)."""

    def __init__(self, node_id: str, name: str, value: Any, error: str | None) -> None:
        super().__init__()
        self.node_id = node_id
        self.name = name
        self.value = value
        self.error = error


class NumberInput(OrderedInput):
    """An INT/FLOAT field: typed, range-checked, nudged with +/- (shift+up/down: ten steps)."""

    BINDINGS = [
        Binding("up", "nudge(1)", "+step", show=False),
        Binding("down", "nudge(-1)", "-step", show=False),
        Binding("shift+up,pageup", "nudge(10)", "+10 steps", show=False),
        Binding("shift+down,pagedown", "nudge(-10)", "-10 steps", show=False),
    ]

    def __init__(self, spec: InputSpec, value: Any, **kwargs: Any) -> None:
        super().__init__(value="" if value is None else str(value), **kwargs)
        self.spec = spec

    def _allows_minus_sign(self) -> bool:
        return self.spec.min is not None and self.spec.min < 0 and self.cursor_position == 0

    async def _on_key(self, event: events.Key) -> None:
        # '+' and '-' nudge instead of being typed (a number field never needs them, except a
        # leading minus sign where negative values are allowed)
        if event.character == "+" or (event.character == "-" and not self._allows_minus_sign()):
            event.stop()
            event.prevent_default()
            self.action_nudge(1 if event.character == "+" else -1)
            return
        await super()._on_key(event)

    def action_nudge(self, times: int) -> None:
        try:
            current = parse_value(self.spec, self.value)
        except ValueError:
            current = self.spec.default or 0
        step = self.spec.step or 1
        new = current + step * times
        if self.spec.min is not None:
            new = max(new, self.spec.min)
        if self.spec.max is not None:
            new = min(new, self.spec.max)
        if self.spec.type == INT:
            new = int(new)
        else:
            new = round(new, 4)
        self.value = str(new)
        self.cursor_position = len(self.value)


class Field(Vertical):
    """One input: a label, an editor and an inline error line."""

    DEFAULT_CSS = """
    Field { height: auto; margin-bottom: 1; }
    Field .error { color: $error; height: auto; display: none; }
    Field .error.shown { display: block; }
    Field Button.link { content-align: left middle; text-style: none; }
    Field .hint { color: $text-muted; }
    Field Horizontal { height: auto; }
    Field TextArea { height: 6; }
    Field Input, Field Select, Field Button { width: 1fr; }
    Field .seed-mode { width: 14; }
    Field .randomize { width: auto; }
    """

    def __init__(self, node_id: str, spec: InputSpec | None, name: str, *children: Any) -> None:
        super().__init__(*children, classes="field")
        self.node_id = node_id
        self.spec = spec
        self.input_name = name

    def set_error(self, text: str | None) -> None:
        line = self.query_one(".error", Static)
        line.update(text or "")
        line.set_class(bool(text), "shown")


class NodePage(Vertical):
    """One node's fields. Pages are kept (hidden) while other nodes are shown and updated in place: a
    widget is never removed under the user's fingers, only a page whose node changed shape, once hidden."""

    DEFAULT_CSS = """
    NodePage { height: auto; }
    """

    def __init__(self, node_id: str, shape: tuple, *children: Any) -> None:
        super().__init__(*children)
        self.node_id = node_id
        self.shape = shape


def _page_shape(doc: WorkflowDocument, node_id: str) -> tuple:
    """What decides which editors a page holds: the node's type and, per input, link or literal."""
    wf = doc.workflow
    spec = get_spec(wf.class_type(node_id))
    inputs = wf.inputs(node_id)
    return (wf.class_type(node_id),
            tuple((i.name, as_link(inputs.get(i.name)) is not None or not i.is_widget) for i in
                  (spec.inputs if spec else ())))


class ParamForm(VerticalScroll):
    DEFAULT_CSS = """
    ParamForm { padding: 0 1; }
    ParamForm .title { text-style: bold; margin-bottom: 1; }
    """

    MAX_PAGES = 16  # hidden pages kept for quick switching; the least recently shown go first

    class LinkRequested(Message):
        def __init__(self, node_id: str, name: str) -> None:
            super().__init__()
            self.node_id = node_id
            self.name = name

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.node_id: str | None = None
        self.errors: dict[tuple[str, str], str] = {}
        self._doc: WorkflowDocument | None = None
        self._pages: dict[str, NodePage] = {}
        self._lock = asyncio.Lock()

    @property
    def page(self) -> NodePage | None:
        return self._pages.get(self.node_id) if self.node_id is not None else None

    async def show_node(self, doc: WorkflowDocument, node_id: str | None, models: ModelPaths | None,
                        issues: list[ValidationIssue], focus: str | None = None) -> None:
        """Show a node's page: made once, then brought up to date in place. One call at a time: a page being
        mounted is not seen half-built by the next keystroke's call."""
        async with self._lock:
            await self._show_node(doc, node_id, models, issues, focus)

    async def _show_node(self, doc: WorkflowDocument, node_id: str | None, models: ModelPaths | None,
                         issues: list[ValidationIssue], focus: str | None) -> None:
        if doc is not self._doc:
            self._doc = doc
            self.errors.clear()
            for stale in list(self._pages):
                self._retire(stale)
        for stale in [n for n in self._pages if n not in doc.workflow]:
            self._retire(stale)
        previous = self.page
        self.node_id = node_id if node_id is not None and node_id in doc.workflow else None
        page = self.page
        if self.node_id is not None:
            shape = _page_shape(doc, self.node_id)
            if page is not None and page.shape != shape:
                self._retire(self.node_id, keep_focus=True)
                page = None
            if page is None:
                page = self._make_page(doc, self.node_id, shape, models)
                self._pages[self.node_id] = page
                await self.mount(page)
            else:
                self._sync(doc, page)
                self._pages[self.node_id] = self._pages.pop(self.node_id)  # most recently shown last
        if previous is not page:
            for other in self._pages.values():
                other.display = other is page
            self.query_one("#hint").display = page is None
            self.scroll_home(animate=False)
        while len(self._pages) > self.MAX_PAGES:
            self._retire(next(iter(self._pages)))
        self.show_issues(issues)
        if focus:
            self.focus_input(focus)

    def refresh_values(self, doc: WorkflowDocument, models: ModelPaths | None,
                       issues: list[ValidationIssue]) -> Any:
        """After an undo, a redo or a queued run changed values: the shown page follows in place (a
        node whose links changed gets a new page); hidden pages catch up when shown."""
        return self.show_node(doc, self.node_id, models, issues)

    def _retire(self, node_id: str, keep_focus: bool = False) -> None:
        """Hide a page now and remove it once it can no longer be rendering or focused."""
        page = self._pages.pop(node_id, None)
        if page is None:
            return
        focused = self.app.focused
        if focused is not None and page in focused.ancestors and not keep_focus:
            self.focus()
        page.display = False
        self.set_timer(0.5, page.remove)

    def _make_page(self, doc: WorkflowDocument, node_id: str, shape: tuple, models: ModelPaths | None) -> NodePage:
        wf = doc.workflow
        spec = get_spec(wf.class_type(node_id))
        widgets: list[Any] = [Static(self._title(doc, node_id), classes="title")]
        if spec and spec.description:
            widgets.append(Static(spec.description, classes="hint"))
        for ispec in spec.inputs if spec else ():
            widgets.append(self._field(doc, node_id, ispec, models))
        page = NodePage(node_id, shape, *widgets)
        page.display = False
        return page

    @staticmethod
    def _title(doc: WorkflowDocument, node_id: str) -> str:
        wf = doc.workflow
        return f"{escape(wf.title(node_id))}  [dim]{wf.class_type(node_id)} · node {node_id}[/]"

    def _sync(self, doc: WorkflowDocument, page: NodePage) -> None:
        """Set each editor to the document's value where they differ (the change events that follow are
        recognised as ours and ignored)."""
        wf = doc.workflow
        node_id = page.node_id
        for title in page.query(".title").results(Static):
            title.update(self._title(doc, node_id))
        inputs = wf.inputs(node_id)
        for field in page.query(Field):
            spec = field.spec
            if spec is None or not spec.is_widget or as_link(inputs.get(field.input_name)) is not None:
                continue
            value = inputs.get(field.input_name, spec.default)
            editor = field.query(".editor").first()
            if isinstance(editor, NumberInput):
                text = "" if value is None else str(value)
                if _parsed(spec, editor.value) != value:
                    _mark(editor, text)
                    editor.value = text
            elif isinstance(editor, TextArea):
                if editor.text != str(value or ""):
                    _mark(editor, str(value or ""))
                    editor.load_text(str(value or ""))
            elif isinstance(editor, Select):
                if editor.value != value and value is not None:
                    options = [o for _, o in getattr(editor, "_options", []) if o is not Select.NULL]  # values
                    if value not in options:
                        editor.set_options([(printable(o), o) for o in [value, *options]])
                    _mark(editor, value)
                    editor.value = value
            elif isinstance(editor, Switch):
                if editor.value != bool(value):
                    _mark(editor, bool(value))
                    editor.value = bool(value)
            elif isinstance(editor, Input):
                if editor.value != str(value or ""):
                    _mark(editor, str(value or ""))
                    editor.value = str(value or "")
            if spec.control_after_generate:
                mode = field.query(".seed-mode")
                if mode and mode.first().value != doc.seed_mode(node_id, field.input_name):
                    _mark(mode.first(), doc.seed_mode(node_id, field.input_name))
                    mode.first().value = doc.seed_mode(node_id, field.input_name)

    def focus_input(self, name: str) -> bool:
        page = self.page
        for field in page.query(Field) if page is not None else ():
            if field.input_name == name:
                editor = field.query(".editor")
                if editor:
                    editor.first().focus()
                    field.scroll_visible()
                    return True
        return False

    def _field(self, doc: WorkflowDocument, node_id: str, ispec: InputSpec, models: ModelPaths | None) -> Field:
        wf = doc.workflow
        value = wf.inputs(node_id).get(ispec.name, ispec.default)
        link = as_link(value)
        label = f"{ispec.name}  [dim]{ispec.type.lower()}"
        if ispec.type in (INT, FLOAT) and ispec.min is not None:
            label += f" {ispec.min:g}…{ispec.max:g}" if ispec.max is not None and ispec.max < 1e12 else ""
        label += "[/]"
        children: list[Any] = [Label(label)]
        if link is not None or not ispec.is_widget:
            text = doc.link_label(link) if link else "not connected"
            children.append(Button(f"{text} ⏎", classes="editor link", compact=True,
                                   tooltip="enter: connect this input to another output"))
        elif ispec.type in (INT, FLOAT):
            editor = NumberInput(ispec, value, classes="editor", tooltip=ispec.tooltip or None, compact=True)
            if ispec.control_after_generate:
                mode = Select([(m, m) for m in SEED_MODES], value=doc.seed_mode(node_id, ispec.name),
                              allow_blank=False, classes="seed-mode", compact=True)
                children.append(editor)
                children.append(Horizontal(Label("after each run ", classes="hint"), mode,
                                           Button("randomize", classes="randomize", compact=True)))
            else:
                children.append(editor)
        elif ispec.type == COMBO:
            options = list(ispec.choices or ())
            if ispec.choices_from and models is not None:
                options = models.list(ispec.choices_from)
            if isinstance(value, str) and value and value not in options:
                options = [value, *options]
            children.append(Select([(printable(o), o) for o in options],
                                   value=value if value in options else Select.NULL,
                                   classes="editor", prompt=f"choose {ispec.name}", compact=True))
        elif ispec.type == BOOLEAN:
            children.append(Switch(bool(value), classes="editor"))
        elif ispec.multiline:
            children.append(PromptBox(str(value or ""), classes="editor"))
        else:
            children.append(OrderedInput(str(value or ""), classes="editor", compact=True))
        children.append(Static("", classes="error"))
        return Field(node_id, ispec, ispec.name, *children)

    def show_issues(self, issues: list[ValidationIssue]) -> None:
        mine = {i.input: i.message for i in issues if i.node_id == self.node_id and i.input}
        page = self.page
        for field in page.query(Field) if page is not None else ():
            local = self.errors.get((field.node_id, field.input_name))
            field.set_error(local or mine.get(field.input_name))

    # -- events from editors --------------------------------------------------------------------------------
    def _field_of(self, widget: Any) -> Field | None:
        for ancestor in widget.ancestors:
            if isinstance(ancestor, Field):
                return ancestor
        return None

    def _edited(self, widget: Any, raw: Any) -> None:
        if _ours(widget, raw):
            return
        field = self._field_of(widget)
        if field is None or field.spec is None:
            return
        spec = field.spec
        try:
            value = parse_value(spec, raw) if isinstance(raw, str) and spec.type in (INT, FLOAT) else raw
            error = check_value(spec, value)
        except ValueError as exc:
            value, error = raw, str(exc)
        key = (field.node_id, field.input_name)
        if error:
            self.errors[key] = error
        else:
            self.errors.pop(key, None)
        field.set_error(error)
        self.post_message(ValueEdited(field.node_id, field.input_name, value, error))

    @on(Input.Changed, ".editor")
    def _input_changed(self, event: Input.Changed) -> None:
        self._edited(event.input, event.value)

    @on(TextArea.Changed, ".editor")
    def _area_changed(self, event: TextArea.Changed) -> None:
        self._edited(event.text_area, event.text_area.text)

    @on(Select.Changed, ".editor")
    def _select_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self._edited(event.select, event.value)

    @on(Switch.Changed, ".editor")
    def _switch_changed(self, event: Switch.Changed) -> None:
        self._edited(event.switch, event.value)

    @on(Select.Changed, ".seed-mode")
    def _seed_mode(self, event: Select.Changed) -> None:
        field = self._field_of(event.select)
        if field is not None and not _ours(event.select, event.value):
            self.post_message(SeedModeChanged(field.node_id, field.input_name, str(event.value)))

    @on(Button.Pressed, ".randomize")
    def _randomize(self, event: Button.Pressed) -> None:
        field = self._field_of(event.button)
        if field is not None:
            editor = field.query_one(NumberInput)
            editor.value = str(random.randint(0, 2**50))

    @on(Button.Pressed, ".link")
    def _link(self, event: Button.Pressed) -> None:
        field = self._field_of(event.button)
        if field is not None:
            self.post_message(self.LinkRequested(field.node_id, field.input_name))

    def compose(self) -> ComposeResult:
        yield Static("Select a node in the tree.", classes="hint", id="hint")


_UNSET = object()


def _mark(editor: Any, value: Any) -> None:
    """Remember the value set from the document, so the change event it causes is not taken for an edit."""
    editor._set_from_document = value


def _ours(editor: Any, value: Any) -> bool:
    expected = getattr(editor, "_set_from_document", _UNSET)
    if expected is _UNSET:
        return False
    editor._set_from_document = _UNSET
    return expected == value


def _parsed(spec: InputSpec, text: str) -> Any:
    try:
        return parse_value(spec, text)
    except ValueError:
        return text


class SeedModeChanged(Message):
    def __init__(self, node_id: str, name: str, mode: str) -> None:
        super().__init__()
        self.node_id = node_id
        self.name = name
        self.mode = mode

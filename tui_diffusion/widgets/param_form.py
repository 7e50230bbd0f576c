"""The parameter form of one node, built from its spec: no node type has a hand-written form."""

from __future__ import annotations

import random
from typing import Any

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


class ValueEdited(Message):
    """A field holds a new valid value (or an invalid one: ``error`` says why)."""

    def __init__(self, node_id: str, name: str, value: Any, error: str | None) -> None:
        super().__init__()
        self.node_id = node_id
        self.name = name
        self.value = value
        self.error = error


class NumberInput(Input):
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


class ParamForm(VerticalScroll):
    DEFAULT_CSS = """
    ParamForm { padding: 0 1; }
    ParamForm .title { text-style: bold; margin-bottom: 1; }
    """

    class LinkRequested(Message):
        def __init__(self, node_id: str, name: str) -> None:
            super().__init__()
            self.node_id = node_id
            self.name = name

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.node_id: str | None = None
        self.errors: dict[tuple[str, str], str] = {}
        self._building = False

    async def show_node(self, doc: WorkflowDocument, node_id: str | None, models: ModelPaths | None,
                        issues: list[ValidationIssue], focus: str | None = None) -> None:
        self._building = True
        self.node_id = node_id
        await self.remove_children()
        if node_id is None or node_id not in doc.workflow:
            await self.mount(Static("Select a node in the tree.", classes="hint"))
            self._building = False
            return
        wf = doc.workflow
        spec = get_spec(wf.class_type(node_id))
        widgets: list[Any] = [Static(f"{wf.title(node_id)}  [dim]{wf.class_type(node_id)} · node {node_id}[/]",
                                     classes="title")]
        if spec and spec.description:
            widgets.append(Static(spec.description, classes="hint"))
        for ispec in spec.inputs if spec else ():
            widgets.append(self._field(doc, node_id, ispec, models))
        await self.mount_all(widgets)
        self.show_issues(issues)
        self._building = False
        if focus:
            self.focus_input(focus)

    def focus_input(self, name: str) -> bool:
        for field in self.query(Field):
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
            children.append(Select([(o, o) for o in options], value=value if value in options else Select.NULL,
                                   classes="editor", prompt=f"choose {ispec.name}", compact=True))
        elif ispec.type == BOOLEAN:
            children.append(Switch(bool(value), classes="editor"))
        elif ispec.multiline:
            area = TextArea(str(value or ""), classes="editor", soft_wrap=True, tab_behavior="focus")
            children.append(area)
        else:
            children.append(Input(str(value or ""), classes="editor", compact=True))
        children.append(Static("", classes="error"))
        return Field(node_id, ispec, ispec.name, *children)

    def show_issues(self, issues: list[ValidationIssue]) -> None:
        mine = {i.input: i.message for i in issues if i.node_id == self.node_id and i.input}
        for field in self.query(Field):
            local = self.errors.get((field.node_id, field.input_name))
            field.set_error(local or mine.get(field.input_name))

    # -- events from editors --------------------------------------------------------------------------------
    def _field_of(self, widget: Any) -> Field | None:
        for ancestor in widget.ancestors:
            if isinstance(ancestor, Field):
                return ancestor
        return None

    def _edited(self, widget: Any, raw: Any) -> None:
        if self._building:
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
        if field is not None and not self._building:
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
        yield Static("Select a node in the tree.", classes="hint")


class SeedModeChanged(Message):
    def __init__(self, node_id: str, name: str, mode: str) -> None:
        super().__init__()
        self.node_id = node_id
        self.name = name
        self.mode = mode

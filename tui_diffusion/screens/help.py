"""The help screen (`?`): every key, grouped by where it works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from tui_diffusion.screens.dialogs import DismissOnce

HELP = """\
# tui-diffusion — keys

Everything works from the keyboard; the footer shows the keys of the focused panel.
`tab` / `shift+tab` move between panels; `ctrl+p` opens the command palette (every action is there).

## Anywhere
| key | action |
|---|---|
| `ctrl+r` or `ctrl+enter` | queue the workflow (blocked, with the reason, while something is invalid) |
| `ctrl+b` | queue several copies, each with the next seed |
| `ctrl+x` | interrupt the running job (in a prompt with text selected: cut) |
| `ctrl+z` / `ctrl+y` | undo / redo any edit |
| `ctrl+o` / `ctrl+s` / `f3` | open / save / save as |
| `ctrl+n` | new workflow from the default text-to-image graph |
| `f5` | graph view: the workflow drawn as boxes and lines (see below) |
| `f4` | history: past jobs with their images; `enter` reopens a job's workflow, `delete` removes it and its files |
| `escape` | back to the node tree (from the form) |
| `ctrl+t` | go to the queue |
| `f2` | under 100 columns (from 100 the image sits beside the tree and form): switch between the editor and \
the images/queue (the preview also comes up \
by itself while a job samples, unless you are typing in a field) |
| `v` | show the current image full-size (any key returns) |
| `?` or `f1` | this help |
| `ctrl+q` | quit (asks first when there are unsaved changes) |

## Node tree (left)
`up`/`down` move, `right`/`left` (or `l`/`h`) open/close a node or group (again: into its first input / out to its
parent), `enter` on a node folds it, `enter` on an input edits it in the form,
`/` or `ctrl+f` type-to-jump (title, type or id; `up`/`down` step through the matches, `enter` stays,
`escape` goes back), `g` on a linked input goes to the node it comes from and `b` comes back,
`a` add a node, `delete` or `x` delete it, `r` rename it.
A ComfyUI UI file's groups are levels of the tree.
Marks: `◆` output node, `»` running now, `!` invalid; after a run each node says *executed* or *cached*
and its time.

## Graph view (`f5`)
Nodes are boxes in columns by depth (ComfyUI's left-to-right order), links are lines; the selected node
and the running one are highlighted. Arrows move between nodes, `shift`+arrows pan, `r` selects the running
node, `enter` opens the selected node's form in the editor, `f5` or `escape` goes back unchanged.

## Parameter form (centre)
Numbers: type, or `+`/`-` (also `up`/`down`) for one step, `shift+up`/`shift+down` for ten.
Seeds have a mode applied after each queued run (fixed, increment, decrement, randomize) and a
*randomize* button. Prompts are multi-line (`tab` leaves the editor) and edit as in an editor:
`ctrl+a` select all, `ctrl+c`/`ctrl+x`/`ctrl+v` copy, cut, paste (also `ctrl+insert`, `shift+delete`,
`shift+insert`), `ctrl+left`/`ctrl+right` (or `alt+left`/`alt+right`) move by words, with `shift` to select.
Weights `(word:1.2)`, emphasis `((word))` and `embedding:name` are highlighted; the line under a prompt
counts its tokens in each 77-token window (75 for the text). A linked input is a button:
`enter` picks the output it comes from. Errors show under the field at once.

## Queue (right, below the image)
`up`/`down` select a job (the image pane shows it), `t` move a pending job to the front,
`delete` or `d` remove a pending job.
"""


class HelpScreen(DismissOnce, ModalScreen):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; height: 90%; border: round $accent; background: $surface; }
    """
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)

"""The help screen (`?`): every key, grouped by where it works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# tui-diffusion — keys

Everything works from the keyboard; the footer shows the keys of the focused panel.
`tab` / `shift+tab` move between panels; `ctrl+p` opens the command palette (every action is there).

## Anywhere
| key | action |
|---|---|
| `ctrl+r` or `ctrl+enter` | queue the workflow (blocked, with the reason, while something is invalid) |
| `ctrl+b` | queue several copies, each with the next seed |
| `ctrl+x` | interrupt the running job |
| `ctrl+z` / `ctrl+y` | undo / redo any edit |
| `ctrl+o` / `ctrl+s` / `f3` | open / save / save as |
| `ctrl+n` | new workflow from the default text-to-image graph |
| `f4` | history: past jobs with their images; `enter` reopens a job's workflow, `delete` removes it and its files |
| `escape` | back to the node tree (from the form) |
| `ctrl+t` | go to the queue |
| `f2` | on a small terminal: switch between the editor and the images/queue |
| `v` | show the current image full-size (any key returns) |
| `?` or `f1` | this help |
| `ctrl+q` | quit (asks first when there are unsaved changes) |

## Node tree (left)
`up`/`down` move, `enter` on a node folds it, `enter` on an input edits it in the form,
`a` add a node, `delete` or `x` delete it, `r` rename it.
Marks: `◆` output node, `»` running now, `!` invalid; after a run each node says *executed* or *cached*
and its time.

## Parameter form (centre)
Numbers: type, or `+`/`-` (also `up`/`down`) for one step, `shift+up`/`shift+down` for ten.
Seeds have a mode applied after each queued run (fixed, increment, decrement, randomize) and a
*randomize* button. Prompts are multi-line (`tab` leaves the editor). A linked input is a button:
`enter` picks the output it comes from. Errors show under the field at once.

## Queue (right, below the image)
`up`/`down` select a job (the image pane shows it), `t` move a pending job to the front,
`delete` or `d` remove a pending job.
"""


class HelpScreen(ModalScreen):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; height: 90%; border: round $accent; background: $surface; }
    """
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)

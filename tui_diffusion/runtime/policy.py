"""The supervision policy: when a dead worker is replaced, and when the runtime gives up. Torch-free.

One policy for the app, ``run`` and ``serve``: a worker that dies is replaced and given the pending jobs
(the job it was running fails with the cause); a worker that dies again and again without finishing a
job in between is not replaced forever: after ``max_restarts`` replacements within ``window`` seconds
the runtime gives up and the jobs still queued are held in the store for ``resume`` (the app's R) once
the cause is fixed. A background server that goes away is not restarted (it is not ours): the app goes
on with a worker of its own and holds what the server had queued.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Decision(enum.Enum):
    RESTART = "restart"
    #: stop replacing the worker; the pending jobs are held
    GIVE_UP = "give up"


@dataclass
class RestartPolicy:
    #: replacements allowed within ``window`` seconds with no job finished in between
    max_restarts: int = 4
    window: float = 120.0
    deaths: list[float] = field(default_factory=list)

    def died(self, now: float | None = None) -> Decision:
        """A worker died: replace it, or give up."""
        now = time.monotonic() if now is None else now
        self.deaths = [t for t in self.deaths if now - t < self.window] + [now]
        return Decision.GIVE_UP if len(self.deaths) > self.max_restarts else Decision.RESTART

    def job_ended(self) -> None:
        """A job got through: the worker is not failing over and over."""
        self.deaths.clear()

    @property
    def count(self) -> int:
        """Deaths within the window so far."""
        return len(self.deaths)

"""Process faults (issue 14, items 1, 4 and 5, and the standing attack suite): SIGTERM and SIGKILL to the run
process, the background server and the worker during a short sweep on the tiny model. After each: every job
submitted is finished with its image, failed with a reason, or offered by ``resume``, and no process outlives
its parent by more than two seconds. The randomized, longer version is ``python -m benchmarks.attack``."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from benchmarks.attack import attack_run, attack_server, make_home, resume_lists
from tests.conftest import TINY, txt2img


@pytest.fixture()
def home(tmp_path: Path, models_dir: Path) -> Path:
    return make_home(tmp_path / "home", models_dir / "checkpoints" / TINY)


def test_a_terminated_run_takes_its_worker_along_and_resume_offers_every_job(home: Path) -> None:
    """The worker used to linger 30 s per unrecorded job (7.5 minutes seen) and ignore SIGTERM; the job it was
    running was then stored as "interrupted", which resume does not offer."""
    result = attack_run(home, "run", signal.SIGTERM, delay=0.0, jobs=3, steps=400)
    assert result.outlived == [], result  # the worker and the resource tracker ended within 2 s of the run
    assert result.lost == [], result
    assert result.states == {"running": 1, "pending": 2}, result  # the running job is resumable, not "interrupted"
    from tui_diffusion.store.history import History

    left = History(home / "history.sqlite3").left_over()
    assert [row.status for row in left] == ["running", "pending", "pending"]
    assert resume_lists(home, [row.id for row in left]) == []


def test_a_killed_server_takes_its_worker_along_and_loses_no_job(home: Path) -> None:
    result = attack_server(home, "server", signal.SIGKILL, delay=0.0, jobs=3, steps=400)
    assert result.outlived == [] and result.lost == [], result
    assert result.jobs == 3 and result.states.get("running") == 1, result


@pytest.mark.slow
@pytest.mark.parametrize(("where", "target", "sig", "delay"), [
    ("run", "run", signal.SIGKILL, 0.7),
    ("run", "worker", signal.SIGTERM, 0.3),
    ("run", "worker", signal.SIGKILL, 0.5),
    ("server", "server", signal.SIGTERM, 0.4),
    ("server", "worker", signal.SIGTERM, 0.2),
])
def test_a_killed_process_loses_no_job_and_leaves_no_orphan(home: Path, where: str, target: str, sig: int,
                                                             delay: float) -> None:
    attack = attack_run if where == "run" else attack_server
    result = attack(home, target, sig, delay, jobs=4, steps=60)
    assert result.outlived == [] and result.lost == [], result
    assert result.jobs == 4, result
    if target == "worker":  # a new worker took the queue: every job ended, none is left
        assert set(result.states) <= {"ok", "error", "running"} and result.states.get("ok", 0) >= 3, result


def test_an_output_file_deleted_since_the_last_run_is_written_again(models_dir: Path, tmp_path: Path) -> None:
    """The unchanged workflow queued again after its PNG was deleted used to report the deleted path."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy

    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(2), ModelPaths(models_dir),
                         tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    executor = Executor(engine)
    data = txt2img(**{"3.steps": 2})
    first = executor.run(data, Hooks(), lambda: False)
    Path(first.outputs[0]).unlink()
    again = executor.run(data, Hooks(), lambda: False)
    assert again.executed == ["9"] and "3" in again.cached  # only the save runs again
    assert len(again.outputs) == 1 and Path(again.outputs[0]).is_file()
    kept = executor.run(data, Hooks(), lambda: False)  # its file is there: nothing runs
    assert kept.executed == [] and kept.outputs == again.outputs

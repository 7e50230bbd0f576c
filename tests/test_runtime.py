"""The runtime (issue 18): one job queue (ids, durable rows, states), one supervision policy, backends typed
against one protocol. Driven with the worker double, so these take a second."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClient
from tests.test_scale_out import FakeSlot
from tui_diffusion import messages as m
from tui_diffusion.backends.pool import Pool
from tui_diffusion.runtime import queue as jobqueue
from tui_diffusion.runtime.policy import Decision, RestartPolicy
from tui_diffusion.runtime.protocol import Backend, Unbatcher, WorkerDied
from tui_diffusion.runtime.supervisor import Supervisor
from tui_diffusion.settings import WorkerConfig
from tui_diffusion.store.history import History, Session

WF = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def _events(runtime: Any, count: int) -> list[Any]:
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        event = runtime.next_event(0.05)
        if event is not None:
            seen.append(event)
    return seen


@pytest.fixture(autouse=True)
def _fresh() -> None:
    FakeClient.instances.clear()


def test_the_policy_restarts_four_times_then_gives_up_and_a_finished_job_resets_it() -> None:
    policy = RestartPolicy()
    assert [policy.died(now=float(t)) for t in range(5)] == [Decision.RESTART] * 4 + [Decision.GIVE_UP]
    policy.job_ended()
    assert policy.died(now=10.0) is Decision.RESTART
    old = RestartPolicy(max_restarts=1, window=60.0)
    assert old.died(now=0.0) is Decision.RESTART
    assert old.died(now=61.0) is Decision.RESTART  # the first death is out of the window


def test_ids_come_from_the_queue_and_states_have_one_vocabulary() -> None:
    job = jobqueue.make_job(WF)
    assert len(job.job_id) == 12 and int(job.job_id, 16) >= 0
    assert jobqueue.make_job(WF, job_id="kept").job_id == "kept"
    assert jobqueue.state_after(m.JobFinished("a", [], [], [], {}, 1.0)) == jobqueue.DONE
    assert jobqueue.state_after(m.JobFinished("a", [], [], [], {}, 1.0, status="interrupted")) == jobqueue.INTERRUPTED
    assert jobqueue.state_after(m.JobFailed("a", None, "x")) == jobqueue.FAILED
    assert jobqueue.state_after(m.Progress("a", "3", 1, 2)) is None
    assert [jobqueue.to_store(s) for s in (jobqueue.DONE, jobqueue.FAILED, jobqueue.REMOVED)] == ["ok", "error",
                                                                                                   "removed"]
    assert jobqueue.from_store("ok") == jobqueue.DONE and jobqueue.from_store("error") == jobqueue.FAILED
    assert not hasattr(m, "JobMoved")  # sent and never read: gone


def test_every_backend_answers_the_protocol(tmp_path: Path) -> None:
    from tui_diffusion.backends.local import WorkerClient
    from tui_diffusion.server import RemoteClient

    config = WorkerConfig(record_history=False)
    for backend in (WorkerClient(config), RemoteClient(folder=tmp_path), Pool([]), FakeClient(config),
                    Supervisor(config, FakeClient)):
        assert isinstance(backend, Backend), type(backend).__name__


def test_batches_are_unwrapped_in_order() -> None:
    batch = Unbatcher()
    assert batch.take([1, 2]) == 1 and batch.take(3) == 2 and batch.pop() == 3 and batch.pop() is None
    batch.push_front(["a", "b"])
    assert batch.take(None) == "a"


def test_a_crash_fails_the_running_job_and_gives_the_pending_ones_to_a_new_worker() -> None:
    runtime = Supervisor(WorkerConfig(record_history=False), FakeClient)
    runtime.start()
    running, pending = runtime.submit(WF), runtime.submit(WF)
    first = FakeClient.instances[-1]
    first.emit(m.JobStarted(running))
    assert [type(e) for e in _events(runtime, 4)] == [m.WorkerReady, m.JobAccepted, m.JobAccepted, m.JobStarted]
    first.crash("the worker process ended (killed by SIGKILL)")
    failed, restarted = _events(runtime, 2)
    assert isinstance(failed, m.JobFailed) and failed.job_id == running and "crashed" in failed.message
    assert isinstance(restarted, m.WorkerRestarted) and restarted.resubmitted == [pending]
    second = FakeClient.instances[-1]
    assert second is not first and first.closed and [j for j, _ in second.submitted] == [pending]


def test_a_worker_that_keeps_dying_is_given_up_on_and_its_jobs_are_held() -> None:
    runtime = Supervisor(WorkerConfig(record_history=False), FakeClient)
    runtime.start()
    job = runtime.submit(WF)
    for _ in range(4):
        FakeClient.instances[-1].crash()
        assert isinstance(runtime.next_event(0.05), m.WorkerRestarted)
    FakeClient.instances[-1].crash()
    failed = runtime.next_event(0.05)
    assert isinstance(failed, m.WorkerFailed) and failed.held == [job] and "giving up" in failed.message
    assert len(FakeClient.instances) == 5
    with pytest.raises(WorkerDied):
        runtime.next_event(0.05)


def test_a_lost_server_is_handed_over_to_a_worker_of_our_own() -> None:
    class Own(FakeClient):
        pass

    runtime = Supervisor(WorkerConfig(record_history=False), FakeClient, fallback=Own)
    runtime.start()
    server = FakeClient.instances[-1]
    server.emit(m.Attached(None, [], 4321))
    _events(runtime, 2)
    server.crash("the server went away")
    lost = _events(runtime, 1)[0]
    assert isinstance(lost, m.ServerLost) and "went away" in lost.reason
    assert isinstance(runtime.backend, Own)
    without = Supervisor(WorkerConfig(record_history=False), FakeClient)  # run --attach: nothing to take over
    without.start()
    FakeClient.instances[-1].emit(m.Attached(None, [], 1))
    _events(without, 2)
    FakeClient.instances[-1].crash("the server went away")
    with pytest.raises(WorkerDied):
        _events(without, 1)


class _Recorded(FakeClient):
    """A double the runtime writes rows for, as it does for a worker process."""

    records_queue = True


def test_the_runtime_writes_the_row_before_submit_returns_and_a_lost_job_is_failed_in_it(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    runtime = Supervisor(WorkerConfig(db_path=db), _Recorded)
    runtime.start()
    job = runtime.submit(WF)
    history = History(db)
    assert [(r.id, r.status) for r in history.jobs()] == [(job, "pending")]
    FakeClient.instances[-1].emit(m.JobStarted(job))
    _events(runtime, 3)
    FakeClient.instances[-1].crash()
    _events(runtime, 2)
    assert [(r.id, r.status) for r in history.jobs()] == [(job, "error")]
    assert "crashed" in (history.jobs()[0].error or "")
    runtime.close()


def test_a_job_removed_by_a_pool_is_recorded_by_the_runtime(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    runtime = Supervisor(WorkerConfig(db_path=db), lambda config: Pool([FakeSlot("slot")]))
    runtime.start()
    runtime.wait_ready(5)
    busy, waiting = runtime.submit(WF), runtime.submit(WF)
    runtime.cancel(waiting)
    assert any(isinstance(e, m.JobRemoved) for e in _events(runtime, 5))
    assert {r.id: r.status for r in History(db).jobs()} == {busy: "pending", waiting: "removed"}
    runtime.close()


def test_a_job_accepted_again_stays_with_the_live_session_that_holds_it(tmp_path: Path) -> None:
    """The worker accepting a job its client queued does not move the row away from the client (INSERT OR
    REPLACE did, and wiped the row's history); a dead session's row is taken over by whoever queues it again."""
    db = tmp_path / "h.sqlite3"
    history = History(db)
    client, worker = Session(db), Session(db)
    history.job_queued("j", WF, client.id)
    history.job_started("j", WF, {}, "a red fox", "cpu")
    history.job_queued("j", WF, worker.id)
    (row,) = history.jobs()
    assert row.session == client.id and row.prompt == "a red fox"
    client.close()  # the client died: its job is left over, and the next one to queue it takes it
    assert [r.id for r in history.left_over()] == ["j"]
    history.job_queued("j", WF, worker.id)
    assert history.jobs()[0].session == worker.id and history.left_over() == []
    worker.close()


def test_the_app_bridge_hands_out_the_queue_ids(tmp_path: Path) -> None:
    from tui_diffusion.bridge import EngineBridge

    posted: list[Any] = []
    bridge = EngineBridge(posted.append, WorkerConfig(db_path=tmp_path / "h.sqlite3"), FakeClient)
    bridge.start()
    job = bridge.submit(WF)
    assert len(job) == 12 and FakeClient.instances[-1].submitted[0][0] == job
    assert bridge.left_over() == []
    bridge.close()


def test_the_remote_backend_hands_out_the_servers_snapshot_first(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An attaching client sees the server's Attached before any live event (it was swallowed once)."""
    import tui_diffusion.server as server

    class Conn:
        def recv(self) -> Any:
            return m.Attached(None, [], 7)

        def poll(self, timeout: float | None) -> bool:
            return False

    monkeypatch.setattr(server, "Client", lambda *a, **k: Conn())
    monkeypatch.setattr(server, "_key", lambda *a, **k: b"key")
    remote = server.RemoteClient(folder=tmp_path)
    remote.start()
    assert isinstance(remote.next_event(0.01), m.Attached) and remote.next_event(0.01) is None

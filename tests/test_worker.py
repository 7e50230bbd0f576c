"""The worker process over multiprocessing queues: ordering, interruption, removal, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import txt2img, wait_for
from tui_diffusion import messages as m
from tui_diffusion.client import WorkerClient
from tui_diffusion.settings import DevicePolicy, WorkerConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    import shutil

    root = tmp_path_factory.mktemp("worker")
    models = root / "models"
    shutil.copytree(models_dir, models)
    good = models / "checkpoints" / "tiny-sd15.safetensors"
    data = good.read_bytes()
    (models / "checkpoints" / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    config = WorkerConfig(models_dir=models, output_dir=root / "out", temp_dir=root / "tmp",
                          device=DevicePolicy("cpu"))
    with WorkerClient(config) as c:
        c.wait_ready(timeout=120)
        yield c


def until_end(client: WorkerClient, job_id: str, timeout: float = 120) -> tuple[object, list]:
    seen = wait_for(client, lambda e, _: isinstance(e, m.JobEnd) and e.job_id == job_id, timeout)
    return seen[-1], seen


def test_ready_reports_device_and_versions(client: WorkerClient) -> None:
    ready = client.ready
    assert ready is not None and ready.device == "cpu" and ready.dtype == "float32"
    assert ready.torch_version and ready.diffusers_version


def test_job_events_in_order(client: WorkerClient) -> None:
    job = client.submit(txt2img(**{"3.seed": 101}))
    end, seen = until_end(client, job)
    assert isinstance(end, m.JobFinished) and end.status == "ok" and Path(end.outputs[0]).is_file()
    kinds = [type(e).__name__ for e in seen if getattr(e, "job_id", None) == job]
    assert kinds[0] == "JobAccepted" and kinds[1] == "JobStarted" and kinds[-1] == "JobFinished"
    steps = [e.step for e in seen if isinstance(e, m.Progress) and e.job_id == job]
    assert steps == [1, 2, 3, 4]


def test_interrupt_stops_within_a_step_and_the_next_job_runs(client: WorkerClient) -> None:
    long = client.submit(txt2img(**{"3.steps": 5000, "3.seed": 7}))
    after = client.submit(txt2img(**{"3.seed": 8}))
    steps_before_cancel = 0
    while steps_before_cancel < 3:
        event = client.next_event(timeout=60)
        if isinstance(event, m.Progress) and event.job_id == long:
            steps_before_cancel = event.step
    client.cancel(long)
    cancelled_at = time.monotonic()
    end, seen = until_end(client, long)
    assert isinstance(end, m.JobFinished) and end.status == "interrupted"
    # 5000 steps take half a minute; the sampler checks for the interrupt at every step (see test_engine)
    assert time.monotonic() - cancelled_at < 1.5
    late = [e.step for e in seen if isinstance(e, m.Progress) and e.job_id == long]
    assert not late or max(late) < 1000, late
    nxt, _ = until_end(client, after)
    assert isinstance(nxt, m.JobFinished) and nxt.status == "ok"
    assert "4" in nxt.cached  # the models stayed loaded


def test_pending_job_can_be_removed(client: WorkerClient) -> None:
    first = client.submit(txt2img(**{"3.steps": 30, "3.seed": 1234}))
    second = client.submit(txt2img(**{"3.seed": 4321}))
    client.cancel(second)
    removed, _ = until_end(client, second)
    assert isinstance(removed, m.JobRemoved)
    done, _ = until_end(client, first)
    assert isinstance(done, m.JobFinished) and done.status == "ok"


def test_a_failing_job_does_not_kill_the_worker(client: WorkerClient) -> None:
    bad = client.submit(txt2img(**{"4.ckpt_name": "truncated.safetensors"}))
    failed, _ = until_end(client, bad)
    assert isinstance(failed, m.JobFailed) and failed.node_id == "4"
    assert "truncated.safetensors" in failed.message and "Traceback" not in failed.message
    invalid = client.submit(txt2img(**{"3.steps": 0}))
    failed2, _ = until_end(client, invalid)
    assert isinstance(failed2, m.JobFailed) and failed2.node_id == "3" and "steps" in failed2.message
    good = client.submit(txt2img(**{"3.seed": 999}))
    ok, _ = until_end(client, good)
    assert isinstance(ok, m.JobFinished) and ok.status == "ok"
    assert client.process.is_alive()


def test_previews_are_small_pngs(client: WorkerClient) -> None:
    job = client.submit(txt2img(**{"3.seed": 55}), previews=True)
    _, seen = until_end(client, job)
    previews = [e.preview_png for e in seen if isinstance(e, m.Progress) and e.preview_png]
    assert previews and all(p.startswith(b"\x89PNG") for p in previews)


def test_pending_job_moves_to_the_front(client: WorkerClient) -> None:
    blocker = client.submit(txt2img(**{"3.steps": 60, "3.seed": 31}))
    order = []
    while not order:
        event = client.next_event(timeout=60)
        if isinstance(event, m.JobStarted):
            order.append(event.job_id)
    a = client.submit(txt2img(**{"3.seed": 32}))
    b = client.submit(txt2img(**{"3.seed": 33}))
    client.move_to_front(b)
    deadline = time.monotonic() + 120
    while len(order) < 3 and time.monotonic() < deadline:
        event = client.next_event(timeout=1)
        if isinstance(event, m.JobStarted):
            order.append(event.job_id)
    assert order == [blocker, b, a]
    until_end(client, a)

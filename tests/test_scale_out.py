"""Scale out: the pool's cache-aware dispatch, a local pool of 2 CPU workers, and Ray actors on a
throwaway local cluster (skipped when Ray is not installed; CI installs it)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY, TINY_SD2, txt2img
from tui_diffusion import messages as m
from tui_diffusion.backends.pool import Pool, parse_gpus


class FakeSlot:
    """A slot that records what it was given and finishes jobs when told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.got: list[str] = []
        self.events: queue.Queue = queue.Queue()

    def start(self) -> None:
        self.events.put(m.WorkerReady("cpu", "fake", "float32", "-", "-", 0))

    def submit(self, job: m.SubmitJob) -> None:
        self.got.append(job.job_id)

    def cancel(self, job_id: str) -> None:
        self.events.put(m.JobFinished(job_id, [], [], [], {}, 0.0, status="interrupted"))

    def finish(self, job_id: str) -> None:
        self.events.put(m.JobStarted(job_id))
        self.events.put(m.JobFinished(job_id, [], [], [], {}, 0.0))

    def next_event(self, timeout: float) -> Any:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.alive = False


def _drain(pool: Pool, until: Any, timeout: float = 5) -> list:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = pool.next_event(0.05)
        if event is not None:
            seen.append(event)
            if until(event):
                return seen
    raise AssertionError(f"timed out; saw {seen}")


def test_a_rerun_goes_to_the_worker_that_holds_its_models() -> None:
    a, b = FakeSlot("a"), FakeSlot("b")
    pool = Pool([a, b])
    pool.start()
    pool.wait_ready(5)
    sd1 = pool.submit(txt2img(**{"3.seed": 1}))
    sd2 = pool.submit(txt2img(**{"4.ckpt_name": TINY_SD2, "3.seed": 1}))
    assert a.got == [sd1] and b.got == [sd2]  # both free: one each
    a.finish(sd1)
    b.finish(sd2)
    ended: set[str] = set()
    _drain(pool, lambda e: isinstance(e, m.JobFinished) and bool(ended.add(e.job_id)) or ended == {sd1, sd2})
    # both free again: each re-run (a new seed) goes where its checkpoint is loaded, whatever the order
    again_sd2 = pool.submit(txt2img(**{"4.ckpt_name": TINY_SD2, "3.seed": 2}))
    again_sd1 = pool.submit(txt2img(**{"3.seed": 2}))
    assert b.got[-1] == again_sd2 and a.got[-1] == again_sd1
    placed = _drain(pool, lambda e: isinstance(e, m.JobPlaced) and e.job_id == again_sd1)
    assert {(e.job_id, e.worker) for e in placed if isinstance(e, m.JobPlaced)} >= {(again_sd2, "b"),
                                                                                   (again_sd1, "a")}
    pool.close()


def test_the_pool_queue_holds_jobs_until_a_worker_is_free_and_can_cancel_them() -> None:
    a = FakeSlot("a")
    pool = Pool([a])
    pool.start()
    pool.wait_ready(5)
    first, second, third = (pool.submit(txt2img(**{"3.seed": s})) for s in (1, 2, 3))
    assert a.got == [first]
    pool.move_to_front(third)
    pool.cancel(second)
    removed = _drain(pool, lambda e: isinstance(e, m.JobRemoved))
    assert removed[-1].job_id == second
    a.finish(first)
    _drain(pool, lambda e: isinstance(e, m.JobFinished) and e.job_id == first)
    assert a.got == [first, third]
    pool.close()


def test_a_lost_slot_fails_its_job_and_the_others_carry_on() -> None:
    a, b = FakeSlot("a"), FakeSlot("b")
    pool = Pool([a, b])
    pool.start()
    pool.wait_ready(5)
    jobs = [pool.submit(txt2img(**{"3.seed": s})) for s in range(4)]
    a.alive = False  # its pump thread ends: lost for good
    failed = _drain(pool, lambda e: isinstance(e, m.JobFailed))[-1]
    assert failed.job_id == jobs[0] and "a was lost" in failed.message
    for job in jobs[1:]:
        deadline = time.monotonic() + 5
        while job not in b.got and time.monotonic() < deadline:
            pool.next_event(0.05)
        b.finish(job)
        _drain(pool, lambda e, j=job: isinstance(e, m.JobFinished) and e.job_id == j)
    assert b.got == jobs[1:]
    pool.close()


def test_gpu_lists_are_parsed() -> None:
    assert parse_gpus("0,2") == ["0", "2"]
    assert parse_gpus("all", 3) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="no GPU"):
        parse_gpus("all", 0)
    with pytest.raises(ValueError, match="indices"):
        parse_gpus("first")


# -- end to end ------------------------------------------------------------------------------------------------
@pytest.fixture()
def workdir(tiny_home: Path) -> Path:
    return tiny_home


SWEEP = ["--set", f"4.ckpt_name={TINY}", "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=12",
         "--sweep", "3.seed=1,2,3,4,5,6,7,8", "--json"]


def _run(workdir: Path, *args: str, timeout: float = 300) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUI_DIFFUSION_DB": str(workdir / "history.sqlite3")}
    proc = subprocess.run([sys.executable, "-m", "tui_diffusion", "run", "workflows/txt2img.json", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _check_sweep(records: list[dict]) -> None:
    assert [r["status"] for r in records] == ["ok"] * 8
    workers = {r["worker"] for r in records}
    assert len(workers) == 2, workers
    for worker in workers:  # the checkpoint is loaded at most once by each worker
        loads = [r for r in records if r["worker"] == worker and "4" in r["executed"]]
        assert len(loads) <= 1, loads
    assert len({r["outputs"][0] for r in records}) == 8 and all(Path(r["outputs"][0]).is_file() for r in records)


@pytest.mark.slow
def test_a_sweep_over_two_local_workers(workdir: Path) -> None:
    _check_sweep(_run(workdir, *SWEEP, "--workers", "2"))


@pytest.mark.slow
def test_a_sweep_over_two_ray_actors_on_a_local_cluster(workdir: Path) -> None:
    pytest.importorskip("ray")
    _check_sweep(_run(workdir, *SWEEP, "--ray", "local", "--workers", "2", timeout=400))


@pytest.mark.slow
def test_a_killed_ray_actor_fails_exactly_its_job(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from tui_diffusion.backends.ray_backend import ray_pool
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = WorkerConfig(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "tmp",
                          device=DevicePolicy("cpu"), db_path=workdir / "history.sqlite3")
    pool = ray_pool(config, "local", 2)
    try:
        pool.start()
        pool.wait_ready(180)
        long = pool.submit(txt2img(**{"3.steps": 3000, "3.seed": 1}))
        rest = [pool.submit(txt2img(**{"3.seed": s, "3.steps": 3})) for s in range(2, 8)]
        ends: dict[str, Any] = {}
        victim = None
        deadline = time.monotonic() + 300
        while len(ends) < 7 and time.monotonic() < deadline:
            event = pool.next_event(0.5)
            if isinstance(event, m.Progress) and event.job_id == long and victim is None:
                victim = next(slot for i, slot in enumerate(pool.slots) if pool.busy.get(i) == long)
                ray.kill(victim.actor)
            if isinstance(event, (m.JobFinished, m.JobFailed)):
                ends[event.job_id] = event
        assert victim is not None and len(ends) == 7
        assert isinstance(ends[long], m.JobFailed) and "was lost" in ends[long].message
        assert all(isinstance(ends[j], m.JobFinished) and ends[j].status == "ok" for j in rest)
        assert all(Path(ends[j].outputs[0]).is_file() for j in rest)
    finally:
        pool.close()
        ray.shutdown()


def test_images_an_actor_wrote_elsewhere_are_fetched_as_bytes(tmp_path: Path) -> None:
    from tui_diffusion.backends.ray_backend import RaySlot
    from tui_diffusion.settings import WorkerConfig

    class Remote:  # the actor's read_file, as Ray's handle exposes it
        def __init__(self, data: bytes) -> None:
            self.read_file = type("Method", (), {"remote": staticmethod(lambda path: data)})()

    class FakeRay:
        @staticmethod
        def get(ref: Any) -> Any:
            return ref

    png = b"\x89PNG not really"
    slot = RaySlot.__new__(RaySlot)
    slot.ray, slot.actor = FakeRay(), Remote(png)
    slot.config = WorkerConfig(output_dir=tmp_path / "here")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "ComfyUI_00001_.png").write_bytes(b"a local image of the same name")
    event = m.JobFinished("j", ["/on/another/machine/ComfyUI_00001_.png"], [], [], {}, 1.0)
    fetched = slot._fetch_outputs(event)
    assert fetched.outputs == [str(tmp_path / "here" / "ComfyUI_00001_-1.png")]  # never overwrites
    assert Path(fetched.outputs[0]).read_bytes() == png
    local = m.JobFinished("k", [fetched.outputs[0]], [], [], {}, 1.0)
    assert slot._fetch_outputs(local) is local  # readable here: nothing to fetch


def test_a_gpu_pool_gives_each_worker_its_own_gpu_and_a_cpu_pool_splits_the_cores() -> None:
    from tui_diffusion.backends.pool import local_pool
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    config = WorkerConfig(device=DevicePolicy("auto", memory="lowvram", precision="fp16"))
    gpus = local_pool(config, gpus=["0", "3"])
    made = [slot.supervisor.config for slot in gpus.slots]
    assert [c.visible_devices for c in made] == ["0", "3"]  # CUDA_VISIBLE_DEVICES, set before torch loads
    assert {c.device.device for c in made} == {"cuda:0"}  # each sees only its own, as device 0
    assert {c.device.memory for c in made} == {"lowvram"} and {c.device.precision for c in made} == {"fp16"}
    assert [s.name for s in gpus.slots] == ["worker 0 (GPU 0)", "worker 1 (GPU 3)"]
    cpus = local_pool(config, workers=2)
    assert [s.supervisor.config.device.device for s in cpus.slots] == ["cpu", "cpu"]
    assert all(s.supervisor.config.torch_threads >= 1 for s in cpus.slots)
    assert all(s.supervisor.config.visible_devices is None for s in cpus.slots)

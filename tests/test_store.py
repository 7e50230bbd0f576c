"""Run history in SQLite, model hashes, PNG metadata (ours, ComfyUI's, A1111's) and opening PNGs."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.conftest import ROOT, TINY, txt2img
from tui_diffusion.graph import Workflow, WorkflowError
from tui_diffusion.graph.a1111 import parse_parameters, txt2img_from_parameters
from tui_diffusion.store.history import SCHEMA_VERSION, History, StoreError


def test_rows_for_ok_failed_and_interrupted_jobs(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite3")
    out = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(out)
    h.job_started("1", txt2img(), {}, "a red fox\nblurry", "cpu (CPU)")
    h.job_finished("1", "ok", outputs=[str(out)], timings={"3": 1.5}, seconds=2.0, models={TINY: "ab" * 32})
    h.job_started("2", txt2img(**{"3.seed": 2}), {"3.seed": [1, 2]}, "a red fox", "cpu (CPU)")
    h.job_finished("2", "error", error="node 4 'Load Checkpoint': truncated", error_node="4")
    h.job_started("3", txt2img(), {}, "a castle", "cpu (CPU)")
    h.job_finished("3", "interrupted")
    rows = {r.id: r for r in h.jobs()}
    assert [r.id for r in h.jobs()] == ["3", "2", "1"]
    assert rows["1"].status == "ok" and rows["1"].timings == {"3": 1.5} and rows["1"].outputs[0]["path"] == str(out)
    assert len(rows["1"].outputs[0]["sha256"]) == 64 and rows["1"].models == {TINY: "ab" * 32}
    assert rows["2"].status == "error" and rows["2"].error_node == "4" and rows["2"].changes == {"3.seed": [1, 2]}
    assert rows["3"].status == "interrupted"
    assert [r.id for r in h.jobs(text="fox")] == ["2", "1"]
    assert [r.id for r in h.jobs(text="100%_")] == []  # LIKE wildcards are literal
    assert h.delete_job("1", delete_files=True) == [str(out)] and not out.exists()
    assert [r.id for r in h.jobs()] == ["3", "2"]


def _writer(path: str, prefix: str) -> None:
    h = History(Path(path))
    for i in range(40):
        h.job_started(f"{prefix}{i}", {"n": {"class_type": "X", "inputs": {}}}, {}, "", "cpu")
        h.job_finished(f"{prefix}{i}", "ok")


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    History(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), p)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(History(path).jobs(limit=1000)) == 80


def test_corrupt_database_is_moved_aside_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    h = History(path)
    assert h.notice and "moved to" in h.notice
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert h.jobs() == []
    h.close()
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer tui-diffusion"):
        History(newer)
    assert newer.exists()


def test_model_hash_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    import hashlib
    import os

    h = History(tmp_path / "h.sqlite3")
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"abc")
    assert h.model_hash(model) == hashlib.sha256(b"abc").hexdigest()
    st = model.stat()
    model.write_bytes(b"xyz")  # same size; the old mtime says "unchanged": the cached hash is kept
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert h.model_hash(model) == hashlib.sha256(b"abc").hexdigest()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert h.model_hash(model) == hashlib.sha256(b"xyz").hexdigest()


A1111 = ("masterpiece, a red fox in snow\nNegative prompt: blurry, lowres\n"
         'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, '
         'Model hash: abcdef1234, Model: dreamshaper_8, Lora hashes: "a: 1, b: 2", Version: v1.9.0')


def test_a1111_parameters_parse_and_rebuild_a_txt2img_graph() -> None:
    parsed = parse_parameters(A1111)
    assert parsed["prompt"] == "masterpiece, a red fox in snow" and parsed["negative"] == "blurry, lowres"
    assert parsed["fields"]["Lora hashes"] == "a: 1, b: 2" and parsed["fields"]["Model hash"] == "abcdef1234"
    api = txt2img_from_parameters(A1111)
    k = api["3"]["inputs"]
    assert (k["steps"], k["cfg"], k["seed"], k["sampler_name"], k["scheduler"]) == (28, 6.5, 1234, "dpmpp_2m",
                                                                                    "karras")
    assert api["5"]["inputs"]["width"] == 512 and api["5"]["inputs"]["height"] == 768
    assert api["4"]["inputs"]["ckpt_name"] == "dreamshaper_8.safetensors"


def _png(path: Path, chunks: dict[str, str]) -> Path:
    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_opening_pngs(tmp_path: Path) -> None:
    api = txt2img(**{"3.seed": 77})
    assert Workflow.load(_png(tmp_path / "ours.png", {"prompt": json.dumps(api)})).inputs("3")["seed"] == 77
    ui = (Path(__file__).parent / "data" / "comfyui-default-graph.ui.json").read_text()
    assert Workflow.load(_png(tmp_path / "comfy.png", {"workflow": ui})).class_type("3") == "KSampler"
    assert Workflow.load(_png(tmp_path / "a1111.png", {"parameters": A1111})).inputs("3")["seed"] == 1234
    broken = _png(tmp_path / "broken.png", {"prompt": "{not json", "parameters": A1111})
    assert Workflow.load(broken).inputs("3")["seed"] == 1234  # falls back to what it can read
    with pytest.raises(WorkflowError, match="holds no workflow"):
        Workflow.load(_png(tmp_path / "plain.png", {}))
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(WorkflowError, match="damaged PNG"):
        Workflow.load(tmp_path / "fake.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    with pytest.raises(WorkflowError, match="neither a JSON workflow nor a PNG"):
        Workflow.load(tmp_path / "photo.jpg")


@pytest.mark.slow
def test_saved_png_carries_api_ui_a1111_and_reproducibility_chunks(models_dir: Path, tmp_path: Path) -> None:
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy
    from tui_diffusion.store.history import sha256_file

    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(1), ModelPaths(models_dir),
                         tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    data = txt2img(**{"3.seed": 5, "3.sampler_name": "euler_ancestral", "3.scheduler": "karras",
                      "6.text": "a red fox", "7.text": "blurry"})
    report = Executor(engine).run(data, Hooks(), lambda: False)
    image = Image.open(report.outputs[0])
    assert json.loads(image.text["prompt"]) == data
    assert Workflow.from_data(json.loads(image.text["workflow"])).to_data() == Workflow.from_data(data).to_data()
    parsed = parse_parameters(image.text["parameters"])
    digest = sha256_file(models_dir / "checkpoints" / TINY)
    assert parsed["prompt"] == "a red fox" and parsed["negative"] == "blurry"
    fields = parsed["fields"]
    assert fields["Steps"] == "4" and fields["Sampler"] == "Euler a Karras" and fields["Seed"] == "5"
    assert fields["Size"] == "64x64" and fields["Model hash"] == digest[:10] and fields["Model"] == "tiny-sd15"
    extra = json.loads(image.text["tui-diffusion"])
    assert extra["device"].startswith("cpu") and extra["dtype"] == "float32" and "torch" in extra
    assert extra["samplers"]["3"]["sampler_name"] == "euler_ancestral"
    assert len(extra["samplers"]["3"]["sigmas"]) == 5 and "CPU torch.Generator" in extra["noise"]
    assert Workflow.load(report.outputs[0]).to_data() == Workflow.from_data(data).to_data()  # re-opens


def test_history_command_lists_jobs_recorded_by_the_worker(tmp_path: Path, models_dir: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "models" / "checkpoints" / TINY)
    env = {**os.environ, "TUI_DIFFUSION_DB": str(tmp_path / "h.sqlite3"), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "tui_diffusion"]
    sets = ["--set", f"4.ckpt_name={TINY}", "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2"]
    run = subprocess.run([*base, "run", str(ROOT / "workflows" / "txt2img.json"), *sets, "--sweep",
                          "3.seed=1,2", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    listed = subprocess.run([*base, "history", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["changes"] == {"3.seed": [1, 2]} and rows[1]["changes"] == {}
    assert rows[0]["models"][TINY] and "beautiful scenery" in rows[0]["prompt"]


def test_a_locked_database_is_reported_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    History(path).close()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        import tui_diffusion.store.history as module

        original = module.sqlite3.connect
        module.sqlite3.connect = lambda *a, **k: original(*a, **{**k, "timeout": 0.2})
        try:
            with pytest.raises(StoreError, match="locked"):
                h = History(path)
                h.job_started("x", {}, {}, "", "cpu")
        finally:
            module.sqlite3.connect = original
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]

"""The headless CLI end to end, as a user runs it: subprocesses, real worker, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, TINY, TXT2IMG

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tui_diffusion", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def workdir(tmp_path: Path, models_dir: Path) -> Path:
    """A user's working folder: ./models/checkpoints with a tiny file the user brought, ./workflows."""
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "models" / "checkpoints" / "user-model.safetensors")
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    return tmp_path


SMALL = ["--set", "4.ckpt_name=user-model.safetensors", "--set", "5.width=64", "--set", "5.height=64",
         "--set", "3.steps=4"]


def test_sweep_json_second_job_runs_only_sampler_decode_save(workdir: Path) -> None:
    out = cli("run", "workflows/txt2img.json", *SMALL, "--sweep", "3.seed=1,2", "--json", cwd=workdir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2  # nothing else on stdout
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"job", "status", "outputs", "executed", "cached", "timings", "error", "worker"}
    assert first["worker"] == second["worker"] == "worker 0 (CPU)"
    assert first["status"] == second["status"] == "ok" and first["error"] is None
    assert first["executed"] == ["4", "6", "7", "5", "3", "8", "9"]
    assert second["executed"] == ["3", "8", "9"] and sorted(second["cached"]) == ["4", "5", "6", "7"]
    assert set(second["timings"]) == {"3", "8", "9"}
    a, b = (Path(j["outputs"][0]) for j in (first, second))
    assert a.parent == (workdir / "output").resolve() and a.name == "ComfyUI_00001_.png"
    assert b.name == "ComfyUI_00002_.png"
    img = Image.open(a)
    assert img.size == (64, 64)
    embedded = json.loads(img.text["prompt"])
    assert embedded["3"]["inputs"]["seed"] == 1 and embedded["4"]["inputs"]["ckpt_name"] == "user-model.safetensors"
    assert not list((workdir / "output").glob(".*"))  # no temporary files left


def test_plain_run_prints_paths_and_same_seed_gives_same_pixels(workdir: Path) -> None:
    one = cli("run", "workflows/txt2img.json", *SMALL, "--set", "3.seed=3", "--cpu", cwd=workdir)
    two = cli("run", "workflows/txt2img.json", *SMALL, "--set", "3.seed=3", "--output-dir", "other", cwd=workdir)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    p1, p2 = Path(one.stdout.strip()), Path(two.stdout.strip())
    assert p1.is_file() and p2.is_file() and "other" in str(p2)
    assert Image.open(p1).tobytes() == Image.open(p2).tobytes()
    assert "Traceback" not in one.stderr


def test_validate_reports_every_problem_and_exits_non_zero(workdir: Path) -> None:
    ok = cli("validate", "workflows/txt2img.json", "--set", "4.ckpt_name=user-model.safetensors", cwd=workdir)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = cli("validate", "workflows/txt2img.json", "--set", "3.steps=0", "--set", "3.sampler_name=nope",
              "--set", "5.width=100", cwd=workdir)
    assert bad.returncode == 2
    for text in ("node 3 'KSampler', input 'steps'", "input 'sampler_name'",
                 "node 5 'Empty Latent Image', input 'width'", "node 4 'Load Checkpoint', input 'ckpt_name'"):
        assert text in bad.stderr
    assert "Traceback" not in bad.stderr


def test_invalid_run_executes_nothing(workdir: Path) -> None:
    out = cli("run", "workflows/txt2img.json", *SMALL, "--set", "3.cfg=-1", "--json", cwd=workdir)
    assert out.returncode == 2 and out.stdout == ""
    assert "node 3 'KSampler', input 'cfg': -1 is below the minimum 0" in out.stderr
    assert not (workdir / "output").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{oops", "malformed JSON"), ('{"a": 1}', "not a workflow"), ('{"1": {"class_type": "Mystery", "inputs": {}}}',
                                                                  "'Mystery' is a custom node type")],
)
def test_bad_workflow_files(workdir: Path, content: str, expected: str) -> None:
    (workdir / "bad.json").write_text(content)
    out = cli("run", "bad.json", cwd=workdir)
    assert out.returncode == 2 and expected in out.stderr and "bad.json" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_set_arguments_are_explained(workdir: Path) -> None:
    out = cli("run", "workflows/txt2img.json", "--set", "3.steps=many", cwd=workdir)
    assert out.returncode == 2 and "input 'steps': 'many' is not an integer" in out.stderr
    out = cli("run", "workflows/txt2img.json", "--set", "3.nothing=1", cwd=workdir)
    assert out.returncode == 2 and "has no input 'nothing'" in out.stderr
    out = cli("run", "workflows/txt2img.json", "--set", "77.seed=1", cwd=workdir)
    assert out.returncode == 2 and "no node '77'" in out.stderr


def test_truncated_checkpoint_fails_the_job_with_a_clear_message(workdir: Path) -> None:
    good = workdir / "models" / "checkpoints" / "user-model.safetensors"
    (good.parent / "half.safetensors").write_bytes(good.read_bytes()[:100_000])
    out = cli("run", "workflows/txt2img.json", *SMALL, "--set", "4.ckpt_name=half.safetensors", "--json", cwd=workdir)
    assert out.returncode == 1
    record = json.loads(out.stdout)
    assert record["status"] == "error" and record["error"]["node"] == "4"
    assert "half.safetensors" in record["error"]["message"] and "truncated" in record["error"]["message"]
    assert "Traceback" not in out.stderr
    assert not (workdir / "output").exists() or not any((workdir / "output").iterdir())


def test_models_lists_families(workdir: Path) -> None:
    (workdir / "models" / "checkpoints" / "junk.safetensors").write_text("no")
    out = cli("models", "--json", cwd=workdir)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["user-model.safetensors"]["family"] == "SD1.x" and rows["user-model.safetensors"]["supported"]
    assert rows["junk.safetensors"]["error"]
    text = cli("models", cwd=workdir)
    assert "user-model.safetensors" in text.stdout and "SD1.x" in text.stdout


def test_no_models_says_how_to_get_one(tmp_path: Path) -> None:
    out = cli("run", str(TXT2IMG), cwd=tmp_path)
    assert out.returncode == 2 and "demo-checkpoint" in out.stderr and "civitai" in out.stderr
    listing = cli("models", cwd=tmp_path)
    assert "demo-checkpoint" in listing.stdout


def test_demo_checkpoint_then_run(tmp_path: Path) -> None:
    made = cli("demo-checkpoint", "--models-dir", "m", cwd=tmp_path)
    assert made.returncode == 0 and (tmp_path / "m" / "checkpoints" / "demo-sd15-tiny.safetensors").is_file()
    out = cli("run", str(TXT2IMG), "--models-dir", "m", "--set", "4.ckpt_name=demo-sd15-tiny.safetensors",
              "--set", "5.width=64", "--set", "5.height=48", "--set", "3.steps=2", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Image.open(json.loads(out.stdout)["outputs"][0]).size == (64, 48)


def test_ctrl_c_interrupts_the_running_job_cleanly(workdir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tui_diffusion", "run", "workflows/txt2img.json", *SMALL,
                             "--set", "3.steps=10000"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "worker ready" not in line:
            line = proc.stderr.readline()
        time.sleep(1.5)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not (workdir / "output").exists() or not any((workdir / "output").iterdir())


def test_sdxl_demo_checkpoint_runs_the_shipped_sdxl_workflow(tmp_path: Path) -> None:
    made = cli("demo-checkpoint", "--family", "sdxl", "--models-dir", "m", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listing = json.loads(cli("models", "--models-dir", "m", "--json", cwd=tmp_path).stdout)
    assert listing[0]["family"] == "SDXL base" and listing[0]["supported"]
    out = cli("run", str(ROOT / "workflows" / "sdxl.json"), "--models-dir", "m",
              "--set", "4.ckpt_name=demo-sdxl-tiny.safetensors", "--set", "5.width=64", "--set", "5.height=64",
              "--set", "3.steps=2", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Image.open(json.loads(out.stdout)["outputs"][0]).size == (64, 64)


def test_import_and_export_commands_and_ui_files_run_directly(workdir: Path) -> None:
    ui_file = Path(__file__).parent / "data" / "comfyui-default-graph.ui.json"
    done = cli("import", str(ui_file), "-o", "api.json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert json.loads((workdir / "api.json").read_text())["3"]["class_type"] == "KSampler"
    done = cli("export", "api.json", "-o", "ui.json", cwd=workdir)
    assert done.returncode == 0 and "nodes" in json.loads((workdir / "ui.json").read_text())
    out = cli("run", str(ui_file), *SMALL, "--json", cwd=workdir)  # a UI file runs as it is
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "ok"


def test_killed_worker_fails_its_job_and_a_new_one_runs_the_rest(workdir: Path) -> None:
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tui_diffusion", "run", "workflows/txt2img.json", *SMALL,
                             "--sweep", "3.steps=3000,2,2", "--json"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "job 1: started" not in line:
            line = proc.stderr.readline()
        time.sleep(1.5)  # the first (long) job is sampling
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) == 1
        workers[0].kill()  # SIGKILL, as the out-of-memory killer would
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = {r["job"]: r for r in (json.loads(line) for line in out.splitlines())}
    assert records[1]["status"] == "error" and "killed by SIGKILL" in records[1]["error"]["message"]
    assert records[2]["status"] == records[3]["status"] == "ok"
    assert "a new worker took the 2 job(s) still queued" in err and "Traceback" not in err
    assert proc.returncode == 1

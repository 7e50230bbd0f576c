"""Installed the way users install it: the shipped workflows are package data found by name from any folder,
the wheel carries them, and the hints the program prints work where they are printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, txt2img
from tui_diffusion import cli
from tui_diffusion.catalogue import resolve_workflow, shipped_workflows, shipped_workflows_dir
from tui_diffusion.graph.workflow import Workflow, WorkflowError
from tui_diffusion.store.history import History

SHIPPED = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_every_shipped_workflow_says_what_it_is_for() -> None:
    flows = {w.name: w for w in shipped_workflows()}
    assert sorted(flows) == SHIPPED
    for flow in flows.values():
        assert flow.description != "(no description)", flow.name
        assert flow.families, flow.name  # its checkpoint loader names the families it is made for
        Workflow.load(flow.path)  # and it is still a workflow the program reads
    assert flows["sdxl"].families == ("sdxl",)
    assert [r.families for r in flows["sdxl-refiner"].requirements if r.kind == "checkpoints"] == \
        [("sdxl",), ("sdxl-refiner",)]


def test_workflows_command_lists_name_family_and_purpose(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["workflows", "--json"]) == cli.EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == SHIPPED
    assert all(r["families"] and r["description"] for r in rows)
    assert cli.main(["workflows"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"^txt2img\s+SD1\.x / SD2\.x / SDXL base\s+ComfyUI's default graph", out, re.M), out


@pytest.mark.parametrize("arg", ["txt2img", "txt2img.json", "workflows/txt2img.json"])
def test_a_shipped_workflow_is_found_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             arg: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_workflow(arg) == shipped_workflows_dir() / "txt2img.json"


def test_a_local_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "txt2img.json").write_text("{}")
    assert resolve_workflow("txt2img.json") == Path("txt2img.json")


def test_an_unknown_name_lists_the_shipped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkflowError, match="not the name of a shipped workflow"):
        resolve_workflow("txt2imgg")
    assert cli.main(["validate", "txt2imgg"]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "not the name of a shipped workflow" in err and "txt2img" in err


def test_validate_takes_a_shipped_name_in_an_empty_folder(tmp_path: Path, models_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["validate", "sdxl", "--models-dir", str(models_dir), "--set", "4.ckpt_name=tiny-sdxl.safetensors"])
    assert code == cli.EXIT_OK, capsys.readouterr().err


def test_the_app_opens_a_shipped_workflow_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_diffusion.app import TuiDiffusionApp
    from tui_diffusion.settings import WorkerConfig

    monkeypatch.chdir(tmp_path)
    app = TuiDiffusionApp(Path("sdxl"), WorkerConfig(models_dir=tmp_path / "models"))
    assert app.open_error is None
    assert app.document.workflow.inputs("5")["width"] == 1024  # the shipped sdxl.json, not the default
    assert app.default_workflow == shipped_workflows_dir() / "txt2img.json"
    assert shipped_workflows_dir() in app.workflow_folders()  # the open dialog lists them
    assert app.workflow_path("img2img") == shipped_workflows_dir() / "img2img.json"


def test_the_demo_hint_names_what_exists_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert cli.main(["demo-checkpoint", "--models-dir", "m"]) == cli.EXIT_OK
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("try: "))
    args = hint.removeprefix("try: tui-diffusion ").split()
    assert args[:2] == ["run", "txt2img"] and "workflows/" not in hint
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same command, validated from another folder
    assert cli.main(["validate", *args[1:]]) == cli.EXIT_OK, capsys.readouterr().err


def test_resume_of_a_job_that_no_longer_validates_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """It read ``args.workflow``, which the resume parser does not define: an AttributeError traceback."""
    monkeypatch.chdir(tmp_path)
    history = History()
    history.job_queued("job-gone", txt2img(**{"4.ckpt_name": "deleted.safetensors"}), session="dead-session")
    history.close()
    code = cli.main(["resume", "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INVALID
    assert "deleted.safetensors" in err and "job-gone" in err


# -- packaging ------------------------------------------------------------------------------------------------
def test_pyproject_lists_every_package() -> None:
    """Packages are listed (the workflows mapping needs it): a new package folder must be added there, or the
    wheel would lack it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tui_diffusion").rglob("__init__.py")}
    assert found | {"tui_diffusion.workflows"} == listed


@pytest.mark.slow
def test_the_wheel_carries_the_workflows_and_finds_them_installed(tmp_path: Path) -> None:
    """Build the wheel, unpack it as an installer would into a folder of its own, and list the workflows from
    there in an empty folder: they come from the installed package, not the checkout."""
    src = tmp_path / "src"  # a copy: the build leaves its build/ folder there, not in the checkout
    src.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    for part in ("tui_diffusion", "workflows"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("tui_diffusion-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"tui_diffusion/workflows/{n}.json" for n in SHIPPED} <= set(names)
    assert any(n.startswith("tui_diffusion/configs/sd15/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([sys.executable, "-c", "import sys; from tui_diffusion import cli, catalogue; "
                             "print(catalogue.shipped_workflows_dir()); sys.exit(cli.main(['workflows', '--json']))"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path / "empty")
    assert listed.returncode == 0, listed.stderr
    folder, _, rows = listed.stdout.partition("\n")
    assert Path(folder) == site / "tui_diffusion" / "workflows"
    assert [r["name"] for r in json.loads(rows)] == SHIPPED


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_run_by_name_in_an_empty_folder_with_a_symlinked_checkpoint(tmp_path: Path, models_dir: Path,
                                                                   layout: str) -> None:
    """Issue 12's "done when": from an empty folder, the shipped txt2img with a checkpoint that is a symlink to a
    file elsewhere (or inside a symlinked folder) writes an image."""
    home = tmp_path / "home"
    (home / "models" / "checkpoints").mkdir(parents=True)
    elsewhere = tmp_path / "shared-models"
    elsewhere.mkdir()
    (elsewhere / TINY).symlink_to(models_dir / "checkpoints" / TINY)
    if layout == "file":
        (home / "models" / "checkpoints" / "demo.safetensors").symlink_to(elsewhere / TINY)
        name = "demo.safetensors"
    else:
        (home / "models" / "checkpoints" / "shared").symlink_to(elsewhere, target_is_directory=True)
        name = f"shared/{TINY}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUI_DIFFUSION_DB": str(tmp_path / "history.sqlite3")}
    done = subprocess.run([sys.executable, "-m", "tui_diffusion", "run", "txt2img", "--set", f"4.ckpt_name={name}",
                           "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2"],
                          capture_output=True, text=True, timeout=300, cwd=home, env=env)
    assert done.returncode == 0, done.stderr
    images = list((home / "output").glob("*.png"))
    assert len(images) == 1 and str(images[0].name) in done.stdout

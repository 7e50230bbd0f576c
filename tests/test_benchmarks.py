"""The benchmark commands run (at their smallest); they assert nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_startup_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--repeat", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["tui_first_frame"]["n"] == 1 and data["tui_first_frame"]["median_s"] > 0
    assert data["bare_textual_first_frame"]["n"] == 1 and data["first_frame_over_bare"] > 0
    assert "| tui_first_frame |" in done.stdout and "| bare_textual_first_frame |" in done.stdout


def test_benchmark_suite_runs_at_its_smallest(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smallest", "--repeat", "1", "--out",
                           str(tmp_path / "out"), "--models", str(tmp_path / "models")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["figures"]) == {"1_sampling_64px", "2_engine_overhead", "3_reruns", "4_startup",
                                    "5_model_load", "6_preview_cost", "7_peak_memory", "8_queue_throughput",
                                    "9_workers"}
    assert data["figures"]["9_workers"]["workers_used_2"] == 2
    assert data["figures"]["3_reruns"]["seed_changed_executed"] == ["3", "8", "9"]
    assert "| 2_engine_overhead |" in (tmp_path / "out" / "results.md").read_text()

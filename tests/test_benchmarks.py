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
    assert "| tui_first_frame |" in done.stdout

"""Snapshots of the graph screen (SVG files in tests/__snapshots__, reviewed by eye): a 40-node workflow at
160x48 with a running node, the same at 80x24 after the selection moved off screen, and shipped workflows.

Update after an intended change with ``pytest tests/test_graph_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_graph_view import ROOT, GraphApp, big_workflow
from tui_diffusion.graph.workflow import Workflow


async def _settle(pilot) -> None:
    await pilot.pause()
    await pilot.pause()


def test_forty_nodes_160x48(snap_compare) -> None:
    assert snap_compare(GraphApp(big_workflow(), "10", "14"), terminal_size=(160, 48), run_before=_settle)


def test_forty_nodes_80x24_scrolled(snap_compare) -> None:
    async def move(pilot) -> None:
        await _settle(pilot)
        await pilot.press("right", "right", "right", "down")
        await _settle(pilot)

    assert snap_compare(GraphApp(big_workflow(), "5"), terminal_size=(80, 24), run_before=move)


@pytest.mark.parametrize(("name", "size"), [("hires-fix", (120, 40)), ("sdxl-refiner", (100, 30))])
def test_shipped_workflow(snap_compare, name: str, size: tuple[int, int]) -> None:
    workflow = Workflow.load(Path(ROOT) / "workflows" / f"{name}.json")
    assert snap_compare(GraphApp(workflow, "3"), terminal_size=size, run_before=_settle)

"""The TUI/CLI side must start fast: importing it must not import torch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_client_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import tui_diffusion.graph, tui_diffusion.cli, tui_diffusion.client, tui_diffusion.messages\n"
        "import tui_diffusion.pipeline.worker, tui_diffusion.modelfiles.describe, tui_diffusion.store.outputs\n"
        "import tui_diffusion.app, tui_diffusion.screens.main, tui_diffusion.bridge, tui_diffusion.images\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

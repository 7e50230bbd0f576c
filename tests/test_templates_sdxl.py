"""ComfyUI's published SDXL templates that use no subgraphs (``comfyui-workflow-templates``, copied unchanged into
``tests/data/templates/``) import from ComfyUI's UI format, validate with nothing missing and run on the tiny SDXL
base and refiner checkpoints placed under the file names they expect (issue 16, "Done when"). Sizes and steps are
made small with the overrides ``tui-diffusion run --set`` applies; nothing else is changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_XL, TINY_XL_REFINER

TEMPLATES = Path(__file__).parent / "data" / "templates"
#: the file names the templates expect -> the tiny checkpoint of that architecture
FILES = {"sd_xl_base_1.0.safetensors": TINY_XL, "sd_xl_refiner_1.0.safetensors": TINY_XL_REFINER,
         "sd_xl_turbo_1.0_fp16.safetensors": TINY_XL}
#: template -> the inputs set small (node id -> values), as ``--set`` would
CASES = {
    "image_sdxl_simple": {"13": {"width": 64, "height": 64}, "12": {"steps": 2}},
    "sdxl_simple_example": {"5": {"width": 64, "height": 64}, "10": {"steps": 3, "end_at_step": 2},
                            "11": {"steps": 3, "start_at_step": 2}},
    "sdxl_refiner_prompt_example": {"5": {"width": 64, "height": 64}, "10": {"steps": 3, "end_at_step": 2},
                                    "11": {"steps": 3, "start_at_step": 2}},
    "sdxlturbo_example": {"5": {"width": 64, "height": 64}},
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    root = Path(tmp_path_factory.mktemp("sdxl-templates"))
    (root / "models" / "checkpoints").mkdir(parents=True)
    for name, tiny in FILES.items():
        (root / "models" / "checkpoints" / name).symlink_to(models_dir / "checkpoints" / tiny)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_sdxl_template_imports_validates_and_runs(home: Path, tmp_path: Path, name: str) -> None:
    from tests.dit_helpers import CPU
    from tui_diffusion.graph.ui_format import ui_to_api
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    api = ui_to_api(json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8")), name)
    for node_id, values in CASES[name].items():
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    paths = ModelPaths(home / "models")
    assert not validate_workflow(Workflow.from_data(api), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1
    image = np.asarray(Image.open(saved[0]))
    assert image.shape[:2] == (64, 64) and image.std() > 0

"""ComfyUI's published SD3.5 and Flux.1 templates (``comfyui-workflow-templates``, copied unchanged into
``tests/data/templates/``) import from ComfyUI's UI format and run on tiny files of the right architectures placed
under the file names they expect (issue 15, "Done when": those without subgraphs; two with subgraphs, Flux Fill
inpainting and Kontext, as well). Sizes and steps are made small with the same overrides ``tui-diffusion run --set``
applies; nothing else in the templates is changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dit_helpers import CPU, shared_models
from tui_diffusion.pipeline import checkpoint_writer_dit as w

TEMPLATES = Path(__file__).parent / "data" / "templates"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder and an input folder holding what the templates name."""
    root = Path(tmp_path_factory.mktemp("templates"))
    (root / "models").symlink_to(shared_models(tmp_path_factory), target_is_directory=True)
    # Kontext's template names fp8 files: a dev transformer and a T5 stored in fp8
    w.write_flux_transformer(root / "extra" / "diffusion_models" / "flux1-dev-kontext_fp8_scaled.safetensors",
                             dtype="fp8_e4m3fn")
    t5 = w.text_encoder_keys({"t5xxl": w.build_t5(seed=3)}, ("t5xxl",), prefix="")  # build_text_encoders' T5
    w.save(t5, root / "extra" / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors", "fp8_e4m3fn")
    # Redux's template: a SigLIP image encoder and the Redux projector (T5's width, as the tiny Flux's)
    from tui_diffusion.pipeline import checkpoint_writer_vision as wv

    wv.write_siglip_vision(root / "extra" / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
    wv.write_redux(root / "extra" / "style_models" / "flux1-redux-dev.safetensors", text_width=w.TinyText().t5_width)
    # SD3.5 Large ControlNets in Stability's layout, the size of the shared SD3.5 checkpoint's transformer
    from tui_diffusion.pipeline import checkpoint_writer_controlnet as cw

    sd35 = w.build_sd3_transformer(w.TinySD3(depth=1))
    for control_type, kind in enumerate(("blur", "canny")):
        cw.write_dit_controlnet(root / "extra" / "controlnet" / f"sd3.5_large_controlnet_{kind}.safetensors",
                                cw.build_sd35_controlnet(sd35, seed=control_type), "sd35", control_type)
    rng = np.random.default_rng(0)
    (root / "input").mkdir()
    for name in ("flux_canny_model_example_input_image.png", "flux_fill_outpaint_example_input_image.png",
                 "flux_kontext_dev_basic_input_image.jpg", "flux_redux_model_example_reference_image_1.png",
                 "flux_redux_model_example_reference_image_2.png", "sd3.5_large_blur_input_image.png",
                 "sd3.5_large_canny_controlnet_example_input_image.png"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "input" / name)
    rgba = rng.integers(0, 256, (48, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:32, 8:24, 3] = 0  # the area to inpaint (LoadImage's mask is 1 - alpha)
    Image.fromarray(rgba).save(root / "input" / "flux_fill_inpaint_example_input_image.png")
    return root


#: template -> the inputs set small (node id -> values), as ``--set`` would
CASES = {
    "flux_schnell": {"27": {"width": 64, "height": 64}, "31": {"steps": 1}},
    "flux_schnell_full_text_to_image": {"27": {"width": 64, "height": 48}, "31": {"steps": 2}},
    "sd3.5_simple_example": {"53": {"width": 64, "height": 64}, "3": {"steps": 1}},
    "flux_canny_model_example": {"3": {"steps": 1}},
    "flux_fill_outpaint_example": {"44": {"left": 16, "right": 8, "bottom": 16, "feathering": 8}, "3": {"steps": 1}},
    "flux_redux_model_example": {"27": {"width": 64, "height": 64}, "30": {"width": 64, "height": 64},
                                 "17": {"steps": 1}},
    # with subgraphs (node ids inside them are "<subgraph node>:<inner node>")
    "flux_fill_inpaint_example": {"47:3": {"steps": 1}},
    "flux_kontext_dev_basic": {"192:31": {"steps": 1}},
    # SD3.5 Large ControlNets (Stability's blur and canny files), ControlNetApplyAdvanced with the VAE
    "sd3.5_large_blur": {"33": {"width": 64, "height": 48}, "3": {"steps": 2}},
    "sd3.5_large_canny_controlnet_example": {"33": {"width": 64, "height": 64}, "48": {"width": 64, "height": 64},
                                             "3": {"steps": 1}},
}
#: FluxKontextImageScale sizes the image to about a megapixel, whatever the input: slower on the CPU
SLOW = {"flux_kontext_dev_basic"}


def _api(name: str) -> dict:
    from tui_diffusion.graph.ui_format import ui_to_api

    return ui_to_api(json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8")), name)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_template_imports_validates_and_runs(home: Path, tmp_path: Path, name: str) -> None:
    from tui_diffusion.graph.validate import validate_workflow
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache

    api = _api(name)
    for node_id, values in CASES[name].items():
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id)
        api[node_id]["inputs"].update(values)
    extra = tuple((kind, home / "extra" / kind)
                  for kind in ("diffusion_models", "text_encoders", "clip_vision", "style_models", "controlnet"))
    paths = ModelPaths(home / "models", input_dir=home / "input", extra=extra)
    assert not validate_workflow(Workflow.from_data(api), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    Executor(engine).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1
    image = np.asarray(Image.open(saved[0]))
    assert image.ndim == 3 and image.std() > 0

"""ComfyUI's published Flux.1 templates whose graph sits in a subgraph (``comfyui-workflow-templates``, copied
unchanged into ``tests/data/templates/``) import, validate with nothing missing and run end to end on tiny
random-weight files placed under the file names they expect (issue 16, "Done when"). What is checked is what a user
sees: the PNGs written, their size, and the workflow carried in their metadata. Sizes and steps are made small with
the overrides ``tui-diffusion run --set`` applies (inner node ids are ``<instance>:<inner node>``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.dit_helpers import CPU
from tests.test_templates import TEMPLATES, home  # noqa: F401  (``home`` is a fixture used here)
from tui_diffusion.pipeline import checkpoint_writer_dit as w

#: template -> the inputs set small (node id -> values), as ``--set`` would
CASES = {
    "flux_dev_checkpoint_example": {"56:50": {"width": 64, "height": 48}, "56:52": {"steps": 1}},
    "flux_dev_full_text_to_image": {"194:48": {"width": 48, "height": 64}, "194:50": {"steps": 2}},
    "flux1_krea_dev": {"200:196": {"width": 64, "height": 64}, "200:197": {"steps": 1}},
    "image_flux.1_fill_dev_OneReward": {"108:3": {"steps": 1}},
}
#: template -> (folder the images go to, {(width, height) of each image written})
EXPECTED = {
    "flux_dev_checkpoint_example": ("out", {(64, 48)}),
    "flux_dev_full_text_to_image": ("out", {(48, 64)}),
    "flux1_krea_dev": ("out", {(64, 64)}),
    # two PreviewImage nodes (its SaveImage is bypassed): the inpainted image and the input, both 40x48
    "image_flux.1_fill_dev_OneReward": ("tmp", {(40, 48)}),
}
#: the input image OneReward's LoadImage names: RGBA, the area to inpaint transparent (LoadImage's mask is 1 - alpha)
ONEREWARD_INPUT = "image_flux.1_fill_dev_OneReward_input_image.png"
KINDS = ("diffusion_models", "text_encoders", "clip_vision", "style_models", "controlnet", "loras")


@pytest.fixture(scope="module")
def files(home: Path) -> Path:  # noqa: F811  (the imported fixture)
    """``home`` of tests/test_templates.py, plus the files only these templates name."""
    extra = home / "extra"
    w.write_flux_transformer(extra / "diffusion_models" / "flux1-krea-dev_fp8_scaled.safetensors", seed=1,
                             dtype="fp8_e4m3fn")
    w.write_flux_transformer(extra / "diffusion_models" / "flux.1-fill-dev-OneReward-transformer_fp8.safetensors",
                             w.TinyFlux(in_channels=384), seed=2, dtype="fp8_e4m3fn")
    _write_flux_lora(extra / "loras" / "removal_timestep_alpha-2-1740.safetensors", w.TinyFlux(in_channels=384))
    rgba = np.random.default_rng(1).integers(0, 256, (48, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:32, 8:24, 3] = 0
    Image.fromarray(rgba).save(home / "input" / ONEREWARD_INPUT)
    return home


def _write_flux_lora(path: Path, sizes: w.TinyFlux) -> None:
    """A rank-2 LoRA on every attention projection of a Flux transformer, in diffusers' names (``transformer.*``,
    as diffusers-based trainers save them)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    sd = {}
    for name, module in w.build_flux_transformer(sizes).named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn." in name:
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=gen) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=gen) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def _api(name: str) -> dict:
    from tui_diffusion.graph.ui_format import ui_to_api

    return ui_to_api(json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8")), name)


@pytest.mark.parametrize("name", list(CASES))
def test_subgraph_template_imports_validates_and_runs(files: Path, tmp_path: Path, name: str) -> None:
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
    paths = ModelPaths(files / "models", input_dir=files / "input",
                       extra=tuple((kind, files / "extra" / kind) for kind in KINDS))
    assert not validate_workflow(Workflow.from_data(api), paths)
    engine = EngineState(CPU, ModelCache(2), paths, tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")
    report = Executor(engine).run(api, Hooks(), lambda: False)

    folder, sizes = EXPECTED[name]
    outputs = [n for n, node in api.items() if node["class_type"] in ("SaveImage", "PreviewImage")]
    saved = sorted((tmp_path / folder).glob("*.png"))
    assert len(saved) == len(outputs) and sorted(map(Path, report.outputs)) == saved
    for path in saved:
        with Image.open(path) as image:
            assert image.size in sizes
            text = dict(image.text)
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0
        assert json.loads(text["prompt"]) == api  # the workflow as run, with its subgraph ids
        ui = json.loads(text["workflow"])  # and in ComfyUI's UI format, to drag back into ComfyUI
        assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())

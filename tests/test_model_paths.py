"""Model names and model folders as users have them: shared folders made of symlinks, Hugging Face cache
snapshots, diffusers folders of every supported family, and names that try to leave their folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, txt2img
from tui_diffusion import cli
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.modelfiles.diffusers_folder import diffusers_folder_family
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.paths import ModelPaths, PathError, check_output_prefix

CONFIGS = ROOT / "tui_diffusion" / "configs"


def _family_id(family: object) -> str:
    return getattr(family, "id", family)  # a Family object (or, in older code, its id)


@pytest.fixture()
def shared(tmp_path: Path, models_dir: Path) -> Path:
    """A models folder whose checkpoint is a symlink to a file in another folder, plus a symlinked sub-folder,
    as users share one model folder between ComfyUI, A1111 and this program."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sd").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, elsewhere / "full.safetensors")
    shutil.copy(models_dir / "checkpoints" / TINY, elsewhere / "sd" / "other.safetensors")
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "full.safetensors").symlink_to(elsewhere / "full.safetensors")
    (root / "checkpoints" / "shared").symlink_to(elsewhere / "sd", target_is_directory=True)
    return root


def test_symlinked_files_and_folders_are_listed_and_resolve(shared: Path) -> None:
    paths = ModelPaths(shared)
    assert paths.list("checkpoints") == ["full.safetensors", "shared/other.safetensors"]
    for name in paths.list("checkpoints"):  # what the listing offers, the loader takes
        assert paths.resolve("checkpoints", name).is_file()
    assert validate_workflow(Workflow.from_data(txt2img(**{"4.ckpt_name": "full.safetensors"})), paths) == []
    assert validate_workflow(Workflow.from_data(txt2img(**{"4.ckpt_name": "shared/other.safetensors"})), paths) == []


def test_a_symlinked_checkpoint_runs(shared: Path, tmp_path: Path) -> None:
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy

    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(1), ModelPaths(shared), tmp_path / "out",
                         tmp_path / "tmp", tmp_path / "cfg")
    result = Executor(engine).run(txt2img(**{"4.ckpt_name": "shared/other.safetensors", "3.steps": 1}), Hooks(),
                                  lambda: False)
    assert [Path(p).suffix for p in result.outputs] == [".png"]


def test_names_that_leave_the_folder_are_refused_even_through_a_symlinked_folder(shared: Path) -> None:
    paths = ModelPaths(shared)
    for name in ["../elsewhere/full.safetensors", "shared/../../elsewhere/full.safetensors", "/etc/passwd",
                 "..", "a\\b.safetensors"]:
        with pytest.raises(PathError):
            paths.resolve("checkpoints", name)
    # a '..' that stays inside is taken lexically: the folder's own file, not the parent of the link's target
    assert paths.resolve("checkpoints", "shared/../full.safetensors") == \
        Path(os.path.abspath(shared)) / "checkpoints" / "full.safetensors"


def test_listing_offers_only_what_loads(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "ok.safetensors").write_bytes(b"x")
    (folder / "broken.safetensors").symlink_to(tmp_path / "gone.safetensors")
    (folder / "back\\slash.safetensors").write_bytes(b"x")
    (folder / "plain-folder").mkdir()
    paths = ModelPaths(tmp_path / "models")
    assert paths.list("checkpoints") == ["ok.safetensors"]
    with pytest.raises(PathError, match="is a folder, not a model file"):
        paths.resolve("checkpoints", "plain-folder")


def test_symlink_loops_in_checkpoints_do_not_hang_models_or_validate(tmp_path: Path, models_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14, item 11: ``ln -s . l1; ln -s . l2`` made ``models`` and ``validate`` walk forever."""
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, folder / TINY)
    (folder / "l1").symlink_to(".", target_is_directory=True)
    (folder / "l2").symlink_to(".", target_is_directory=True)
    (tmp_path / "wf.json").write_text(json.dumps(txt2img(**{"4.ckpt_name": "missing.safetensors"})))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["models"], ["validate", "wf.json"]):
        done = subprocess.run([sys.executable, "-m", "tui_diffusion", *args], capture_output=True, text=True,
                              timeout=60, env=env)
        assert "Traceback" not in done.stderr, done.stderr
        assert TINY in done.stdout + done.stderr
    assert ModelPaths(tmp_path / "models").list("checkpoints") == [TINY]


@pytest.mark.parametrize(("node", "value"), [("4.ckpt_name", "tiny\x00.safetensors"), ("4.ckpt_name", "."),
                                             ("4.ckpt_name", "./"), ("9.filename_prefix", "../../evil"),
                                             ("9.filename_prefix", "/tmp/evil"), ("9.filename_prefix", "a\x00b")])
def test_validate_refuses_bad_names_up_front(tmp_path: Path, models_dir: Path, node: str, value: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14, items 9 and 18: a NUL byte was a ValueError traceback; '.' and '../../evil' passed validation
    and failed only at run time."""
    (tmp_path / "wf.json").write_text(json.dumps(txt2img(**{node: value})))
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "run"):  # run validates before it starts a worker
        code = cli.main([command, "wf.json", "--models-dir", str(models_dir)])
        err = capsys.readouterr().err
        assert code == cli.EXIT_INVALID, err
        node_id, name = node.split(".")
        assert f"node {node_id} " in err and f"input '{name}'" in err
    assert not (tmp_path.parent / "evil").exists()


def test_a_nul_byte_in_an_image_name_is_a_validation_error(tmp_path: Path, models_dir: Path) -> None:
    data = json.loads((ROOT / "workflows" / "img2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY
    data["1"]["inputs"]["image"] = "a\x00.png"
    issues = [str(i) for i in validate_workflow(Workflow.from_data(data), ModelPaths(models_dir, tmp_path))]
    assert any("node 1 " in i and "NUL" in i for i in issues), issues


def test_output_prefixes_inside_the_output_folder_are_accepted() -> None:
    assert check_output_prefix("ComfyUI") is None
    assert check_output_prefix("portraits/cat") is None
    assert check_output_prefix("a/../b") is None
    assert "outside" in check_output_prefix("a/../../b")


# -- diffusers folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("folder", "family", "prediction"), [
    ("sd15", "sd1", "epsilon"), ("sd21-v", "sd2", "v_prediction"), ("sdxl-base", "sdxl", "epsilon"),
    ("sdxl-refiner", "sdxl-refiner", "epsilon")])
def test_family_of_real_diffusers_configs(folder: str, family: str, prediction: str) -> None:
    """The configs shipped in the package are the real models' (Stable Diffusion 1.5, 2.1-v, SDXL base and
    refiner): their folders are told apart from the configs alone."""
    info = diffusers_folder_family(CONFIGS / folder)
    assert (info.family, info.prediction) == (family, prediction)


@pytest.mark.parametrize(("folder", "family"), [("sd15", "sd1-inpaint"), ("sd21-v", "sd2-inpaint")])
def test_a_nine_channel_unet_is_an_inpainting_model(tmp_path: Path, folder: str, family: str) -> None:
    shutil.copytree(CONFIGS / folder, tmp_path / folder)
    config = tmp_path / folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 9}))
    assert diffusers_folder_family(tmp_path / folder).family == family


@pytest.mark.parametrize(("config", "pipeline", "family"), [("sd3.5-medium", "StableDiffusion3Pipeline", "sd3"),
                                                            ("flux1-dev", "FluxPipeline", "flux")])
def test_transformer_folders_are_recognised(tmp_path: Path, config: str, pipeline: str, family: str) -> None:
    shutil.copytree(CONFIGS / config / "transformer", tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                           "transformer": ["diffusers", "X"]}))
    assert diffusers_folder_family(tmp_path).family == family


def test_a_folder_without_configs_is_named(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(CheckpointError, match=r"unet/config\.json: missing"):
        diffusers_folder_family(tmp_path)


def _save_folder(kind: str, path: Path) -> Path:
    """A tiny random diffusers folder of one family, as ``save_pretrained`` writes it."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    from tui_diffusion.pipeline import checkpoint_writer as w

    tok_dir = CONFIGS / "clip_tokenizer"
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>")
    if kind.startswith("sd2"):
        unet, vae, text = w.build_sd2_models(w.TinySD2(), seed=0, v_prediction=kind == "sd2-v")
        scheduler = DDIMScheduler.from_pretrained(str(CONFIGS / "sd21-v"), subfolder="scheduler",
                                                  prediction_type="v_prediction" if kind == "sd2-v" else "epsilon")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        unet, vae, text, text_2 = w.build_sdxl_models(w.TinySDXL(), seed=0)
        scheduler = EulerDiscreteScheduler.from_pretrained(str(CONFIGS / "sdxl-base"), subfolder="scheduler")
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                             tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
        else:
            refiner_unet = w._sdxl_unet(w.TinySDXL(), w.TinySDXL().clip_g_width, size_numbers=5).eval()
            pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_2,
                                                    tokenizer=None, tokenizer_2=tokenizer, unet=refiner_unet,
                                                    scheduler=scheduler, requires_aesthetics_score=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def _as_hf_snapshot(folder: Path, cache: Path) -> Path:
    """The same folder laid out as the Hugging Face cache holds it: files in blobs/, the snapshot made of
    symlinks into them."""
    repo = cache / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "family", "prediction"), [("sd2", "sd2", "epsilon"),
                                                            ("sd2-v", "sd2", "v_prediction"),
                                                            ("sdxl", "sdxl", "epsilon"),
                                                            ("sdxl-refiner", "sdxl-refiner", "epsilon")])
def test_diffusers_folders_of_each_family_load_offline(tmp_path: Path, kind: str, family: str,
                                                       prediction: str) -> None:
    """Before, every folder that was not SDXL base loaded as SD1.x: an SD2.x or refiner folder got the wrong
    pipeline and conditioning."""
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.settings import DevicePolicy

    folder = _save_folder(kind, tmp_path / "saved")
    info = diffusers_folder_family(folder)
    assert (info.family, info.prediction) == (family, prediction)
    # in checkpoints/ as a symlink to a Hugging Face cache snapshot whose files are symlinks into blobs/
    snapshot = _as_hf_snapshot(folder, tmp_path / "hub")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "from-hub").symlink_to(snapshot, target_is_directory=True)
    paths = ModelPaths(tmp_path / "models")
    assert paths.list("checkpoints") == ["from-hub"]
    loaded = load_checkpoint(paths.resolve("checkpoints", "from-hub"), resolve_device(DevicePolicy("cpu")),
                             tmp_path / "cfg")
    assert _family_id(loaded.model.family) == family
    assert loaded.model.scheduler_config.get("prediction_type", "epsilon") == prediction
    assert len(loaded.clip.encoders) == (1 if kind != "sdxl" else 2)
    assert len(paths.fingerprint("checkpoints", "from-hub")) > 3  # the blobs' sizes and times, through the links


# -- LoRA files ------------------------------------------------------------------------------------------
def test_a_lora_for_a_transformer_model_loads_for_the_denoising_network(tmp_path: Path) -> None:
    """Keys 'transformer.*' passed the key pattern and then failed with a KeyError (issue 12); they were then
    refused; now they patch the SD3/Flux transformer (tests/test_lora_flux.py applies them)."""
    import torch
    from safetensors.torch import save_file

    from tui_diffusion.pipeline.lora import load_lora

    path = tmp_path / "flux-style.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(path))
    assert set(load_lora(path).pairs) == {"unet:single_transformer_blocks.0.attn.to_q"}


def test_models_describes_the_file_the_loader_takes(tmp_path: Path, models_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``models`` read every name in the first folder (a file from extra_model_paths was 'not found') and called
    SDXL diffusers folders unsupported although they load."""
    other = tmp_path / "comfyui" / "models" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, other / TINY)
    own = tmp_path / "models" / "checkpoints"
    shutil.copytree(CONFIGS / "sdxl-base", own / "xl-diffusers")  # the configs of a real SDXL base folder
    (tmp_path / "extra.yaml").write_text(f"comfyui:\n  base_path: {tmp_path / 'comfyui'}\n  checkpoints: "
                                         "models/checkpoints\n")
    code = cli.main(["models", "--json", "--models-dir", str(tmp_path / "models"),
                     "--extra-model-paths", str(tmp_path / "extra.yaml")])
    assert code == cli.EXIT_OK
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[TINY]["family"] == "SD1.x" and rows[TINY]["error"] is None
    assert rows["xl-diffusers"]["family"] == "SDXL base (diffusers folder)" and rows["xl-diffusers"]["supported"]


BROKEN_YAML = [b"\xff\xfe not utf-8", b"a: " + b"[" * 5000, b"comfyui:\n  base_path: " + b"9" * 5000]


@pytest.mark.parametrize("content", BROKEN_YAML)
def test_a_broken_extra_model_paths_file_is_a_path_error_naming_it(tmp_path: Path, content: bytes) -> None:
    from tui_diffusion.paths import PathError, read_extra_model_paths

    bad = tmp_path / "extra_model_paths.yaml"
    bad.write_bytes(content)
    with pytest.raises(PathError, match="extra_model_paths.yaml"):
        read_extra_model_paths(bad)

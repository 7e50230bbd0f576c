"""The single-file loader (``modelfiles/single_file.py``): the same models as diffusers' ``from_single_file``,
weights cast once into memory of their own, and text encoders/VAEs shared between checkpoints that hold the
same bytes for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, TINY, TINY_SD2_V, TINY_XL, TINY_XL_REFINER
from tui_diffusion.families import detect
from tui_diffusion.modelfiles import single_file
from tui_diffusion.modelfiles.configs import write_config_folder
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.models import LoadedCheckpoint, _pipeline_kwargs, finish_pipeline, load_checkpoint
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


@pytest.fixture(autouse=True)
def no_shared_parts() -> None:
    """Each test starts with no text encoder or VAE to reuse."""
    single_file.SHARED.clear()


def _parts(loaded: LoadedCheckpoint) -> dict[str, torch.nn.Module]:
    parts = {"unet": loaded.model.unet, "vae": loaded.vae.vae}
    parts.update({f"te{i}": e.model for i, e in enumerate(loaded.clip.encoders)})
    return parts


def _config(module: torch.nn.Module) -> dict:
    config = module.config
    return dict(config) if hasattr(config, "keys") else config.to_dict()


@pytest.mark.parametrize("name", [TINY, TINY_SD2_V, TINY_XL, TINY_XL_REFINER])
def test_the_models_are_those_of_diffusers_from_single_file(models_dir: Path, tmp_path: Path, name: str) -> None:
    """SD1 (CLIP), SD2 (OpenCLIP, v-prediction), SDXL and the refiner: every parameter bit for bit, the
    configs, the scheduler config and the tokenizers as diffusers' own loader builds them."""
    path = models_dir / "checkpoints" / name
    ours = load_checkpoint(path, CPU, tmp_path / "cfg")
    header = read_header(path)
    family = detect(header)
    prediction = ours.model.scheduler_config.get("prediction_type", "epsilon")
    folder = write_config_folder(family.configs(header, str(path), prediction), tmp_path / "cfg")
    pipe = family.pipeline_class().from_single_file(str(path), config=str(folder), **_pipeline_kwargs(family, CPU))
    theirs = finish_pipeline(family, pipe, CPU, str(path))
    a_parts, b_parts = _parts(ours), _parts(theirs)
    assert a_parts.keys() == b_parts.keys()
    for part, a in a_parts.items():
        b = b_parts[part]
        assert type(a) is type(b) and _config(a) == _config(b), part
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (part, key)
        assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert ours.model.scheduler_config == theirs.model.scheduler_config
    for a, b in zip(ours.clip.encoders, theirs.clip.encoders, strict=True):
        assert a.tokenizer("a lighthouse at dusk")["input_ids"] == b.tokenizer("a lighthouse at dusk")["input_ids"]
        with torch.inference_mode():
            ids = torch.tensor([b.tokenizer("a lighthouse")["input_ids"]])
            assert torch.equal(a.model(ids).last_hidden_state, b.model(ids).last_hidden_state)


def test_each_weight_is_cast_into_memory_of_its_own(models_dir: Path, tmp_path: Path) -> None:
    """fp32 file, fp32 compute: no parameter is left a view of the file's mapping (which would fault if the file
    were replaced) or of any larger buffer; every one holds exactly its own bytes."""
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path)
    assert read_header(models_dir / "checkpoints" / TINY)[
        "model.diffusion_model.out.2.weight"].dtype == "F32"  # the case where a cast would be a no-op
    for part, module in _parts(loaded).items():
        for name, p in module.named_parameters():
            assert p.device.type == "cpu" and p.dtype == torch.float32, (part, name)
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), (part, name)


def _variant(source: Path, target: Path, change: str | None) -> Path:
    """A copy of ``source`` with one element of the first tensor under ``change`` altered."""
    state = load_file(str(source))
    if change is not None:
        key = next(k for k in sorted(state) if k.startswith(change) and state[k].is_floating_point())
        state[key] = state[key].clone()
        state[key].view(-1)[0] += 1.0
    save_file(state, str(target))
    return target


def test_a_second_checkpoint_with_the_same_text_encoder_or_vae_reuses_it(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "checkpoints" / TINY
    other_unet = _variant(base, tmp_path / "other-unet.safetensors", "model.diffusion_model.")
    other_text = _variant(base, tmp_path / "other-text.safetensors", "cond_stage_model.")
    other_vae = _variant(base, tmp_path / "other-vae.safetensors", "first_stage_model.decoder.")
    first = load_checkpoint(base, CPU, tmp_path / "cfg")
    a = load_checkpoint(other_unet, CPU, tmp_path / "cfg")
    assert a.clip.encoders[0].model is first.clip.encoders[0].model
    assert a.vae.vae is first.vae.vae
    assert a.model.unet is not first.model.unet
    b = load_checkpoint(other_text, CPU, tmp_path / "cfg")
    assert b.clip.encoders[0].model is not first.clip.encoders[0].model  # one element differs: its own
    assert b.vae.vae is first.vae.vae
    c = load_checkpoint(other_vae, CPU, tmp_path / "cfg")
    assert c.vae.vae is not first.vae.vae
    assert c.clip.encoders[0].model is first.clip.encoders[0].model
    # the same file under another dtype is not the same model
    bf16 = load_checkpoint(base, resolve_device(DevicePolicy("cpu", precision="bf16")), tmp_path / "cfg")
    assert bf16.clip.encoders[0].model is not first.clip.encoders[0].model
    assert next(bf16.clip.encoders[0].model.parameters()).dtype == torch.bfloat16


def test_a_replaced_file_is_not_taken_for_the_one_loaded_before(models_dir: Path, tmp_path: Path) -> None:
    path = _variant(models_dir / "checkpoints" / TINY, tmp_path / "model.safetensors", None)
    first = load_checkpoint(path, CPU, tmp_path / "cfg")
    _variant(models_dir / "checkpoints" / TINY, path, "cond_stage_model.")  # new text encoder, same name
    second = load_checkpoint(path, CPU, tmp_path / "cfg")
    assert second.clip.encoders[0].model is not first.clip.encoders[0].model
    # the file the first models came from changed, so their bytes cannot be compared any more: nothing is reused
    assert second.vae.vae is not first.vae.vae


def test_a_missing_tensor_is_an_error_naming_the_file_and_the_model(models_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(models_dir / "checkpoints" / TINY))
    del state["first_stage_model.decoder.mid.block_1.norm1.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: incomplete checkpoint: the vae lacks 1"):
        load_checkpoint(path, CPU, tmp_path / "cfg")


def test_the_phases_of_a_load_are_recorded(models_dir: Path, tmp_path: Path) -> None:
    load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path)
    phases = single_file.last_phases.seconds
    assert {"open", "convert keys", "wait for the cast", "assign"} <= set(phases)
    assert all(v >= 0 for v in phases.values())


def test_read_ahead_finds_the_model_files_a_workflow_names(models_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import TXT2IMG
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.modelfiles.readahead import read_ahead, workflow_model_files
    from tui_diffusion.paths import ModelPaths

    data = json.loads(TXT2IMG.read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY
    models = ModelPaths(models_dir)
    files = workflow_model_files(Workflow.from_data(data), models)
    assert files == [models_dir / "checkpoints" / TINY]
    data["4"]["inputs"]["ckpt_name"] = "../../etc/passwd"  # not a model: validation's business, not read
    assert workflow_model_files(Workflow.from_data(data), models) == []
    thread = read_ahead(files)
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert read_ahead([tmp_path / "missing.safetensors"]) is None


def test_run_hashes_the_checkpoint_into_the_history_while_the_worker_starts(models_dir: Path, tmp_path: Path) -> None:
    """The first saved image names the checkpoint's sha256; ``run`` hashes it into the history's table from its
    own thread (the CLI is idle while its worker imports torch), so the worker's save finds it there."""
    from dataclasses import replace

    from tests.conftest import TXT2IMG
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.modelfiles.readahead import hash_ahead
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.settings import WorkerConfig
    from tui_diffusion.store.history import History, sha256_file

    data = json.loads(TXT2IMG.read_text())
    data["4"]["inputs"]["ckpt_name"] = TINY
    models = ModelPaths(models_dir)
    config = WorkerConfig(db_path=tmp_path / "history.db")
    thread = hash_ahead(Workflow.from_data(data), models, config)
    assert thread is not None
    thread.join(timeout=60)
    history = History(config.db_path)
    try:
        ckpt = (models_dir / "checkpoints" / TINY).resolve()
        row = history.db.execute("SELECT sha256 FROM model_hashes WHERE path = ?", (str(ckpt),)).fetchone()
        assert row is not None and row[0] == sha256_file(ckpt)
    finally:
        history.close()
    # nothing to do: history off, or no node whose image names the checkpoint
    assert hash_ahead(Workflow.from_data(data), models, replace(config, record_history=False)) is None
    unsaved = {k: v for k, v in data.items() if v["class_type"] != "SaveImage"}
    assert hash_ahead(Workflow.from_data(unsaved), models, config) is None
    # a damaged database is the worker's to move aside and report: the CLI's thread leaves it as it is
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database" * 100)
    thread = hash_ahead(Workflow.from_data(data), models, replace(config, db_path=damaged))
    assert thread is not None
    thread.join(timeout=60)
    assert damaged.read_bytes() == b"this is not a database" * 100
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("damaged")) == ["damaged.db"]


@pytest.mark.slow
def test_the_first_image_benchmark_reports_every_phase(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "first.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.first_image", "--models", str(models_dir), "--ckpt",
                           TINY, "--size", "64", "--steps", "1", "--repeat", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"load", "encode", "sample", "decode", "save", "CLI imports"} <= set(data["phases_s"])
    assert data["phases_s"]["load"] > 0 and data["phases_s"]["sample"] > 0
    assert 0 < data["total_to_png_s"] <= data["total_to_exit_s"]
    assert "| load |" in done.stdout

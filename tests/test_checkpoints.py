"""Single-file checkpoints in the original layout: writing, reading shapes, loading offline."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tui_diffusion.modelfiles.configs import sd1_configs
from tui_diffusion.modelfiles.describe import describe_checkpoint
from tui_diffusion.modelfiles.family import detect_family
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.pipeline.checkpoint_writer import TinySD1, build_sd1_models, write_sd1_checkpoint
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.models import load_checkpoint
from tui_diffusion.settings import DevicePolicy

CPU = resolve_device(DevicePolicy("cpu"))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # transformers 5 names CLIPTextModel's keys without the "text_model." level; compare on the short form
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


@pytest.mark.parametrize(
    "sizes",
    [
        TinySD1(),
        TinySD1(unet_channels=(32, 64, 64), unet_attention=(True, True, False), layers_per_block=2,
                transformer_depth=2, text_width=128, text_layers=3, vae_channels=(32, 64, 64, 64), vae_layers=2),
    ],
    ids=["smallest", "three-levels"],
)
def test_written_file_loads_back_tensor_for_tensor(tmp_path: Path, sizes: TinySD1) -> None:
    path = write_sd1_checkpoint(tmp_path / "m.safetensors", sizes, seed=5)
    loaded = load_checkpoint(path, CPU, tmp_path / "cfg")
    unet, vae, text = build_sd1_models(sizes, seed=5)
    assert_same_weights(unet, loaded.model.unet)
    assert_same_weights(vae, loaded.vae.vae)
    assert_same_weights(text, loaded.clip.encoders[0].model)
    assert loaded.model.unet.config.layers_per_block == sizes.layers_per_block
    assert list(loaded.model.unet.config.block_out_channels) == list(sizes.unet_channels)


def test_fp16_file_loads_in_float32_on_cpu(tmp_path: Path) -> None:
    path = write_sd1_checkpoint(tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_checkpoint(path, CPU, tmp_path / "cfg")
    assert loaded.model.unet.dtype == torch.float32


def test_file_carries_the_keys_real_files_have(models_dir: Path) -> None:
    header = read_header(models_dir / "checkpoints" / TINY)
    for key in ("alphas_cumprod", "betas", "model_ema.decay",
                "cond_stage_model.transformer.text_model.embeddings.position_ids",
                "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert key in header, key
    assert header["first_stage_model.decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)


def test_sizes_come_from_shapes_and_heads_from_convention(models_dir: Path) -> None:
    path = models_dir / "checkpoints" / TINY
    header = read_header(path)
    files = sd1_configs(header, str(path))
    unet = files["unet/config.json"]
    assert unet["block_out_channels"] == [32, 64] and unet["layers_per_block"] == 1
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet["attention_head_dim"] == 8 and unet["cross_attention_dim"] == 64
    text = files["text_encoder/config.json"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 1)
    assert files["vae/config.json"]["block_out_channels"] == [32, 32, 32, 32]


def test_tokenizer_ships_with_the_package(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path / "cfg")
    assert loaded.clip.encoders[0].tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_diffusers_folder_in_checkpoints_loads(models_dir: Path, tmp_path: Path) -> None:
    folder = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15-diffusers", CPU, tmp_path / "cfg")
    single = load_checkpoint(models_dir / "checkpoints" / TINY, CPU, tmp_path / "cfg")
    assert_same_weights(folder.model.unet, single.model.unet)


def test_truncated_and_foreign_files_are_refused_by_name(broken_models: Path, tmp_path: Path) -> None:
    ck = broken_models / "checkpoints"
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: truncated file"):
        load_checkpoint(ck / "truncated.safetensors", CPU, tmp_path)
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a safetensors file"):
        load_checkpoint(ck / "notes.safetensors", CPU, tmp_path)


def test_header_that_lies_is_rejected_before_reading_data(tmp_path: Path) -> None:
    path = tmp_path / "liar.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_header(huge)


def test_unknown_and_unsupported_families_are_named(tmp_path: Path) -> None:
    assert detect_family(["double_blocks.0.img_attn.qkv.weight"]).id == "flux"
    assert detect_family(["model.diffusion_model.joint_blocks.0.x"]).id == "sd3"
    assert detect_family(["model.diffusion_model.x", "conditioner.embedders.1.model.ln_final.weight"]).id == "sdxl"
    assert not detect_family(["something.else"]).supported
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: no Stable Diffusion UNet in it"):
        load_checkpoint(path, CPU, tmp_path)
    row = describe_checkpoint(path, "other.safetensors")
    assert row["family"] == "unknown" and not row["supported"]

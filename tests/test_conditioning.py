"""CLIPTextEncode's weights, long prompts and CLIPSetLastLayer, checked against the text encoder itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.models import ClipHandle, load_checkpoint
from tui_diffusion.pipeline.nodes import encode_text
from tui_diffusion.settings import DevicePolicy


@pytest.fixture(scope="module")
def clip(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipHandle:
    loaded = load_checkpoint(models_dir / "checkpoints" / TINY, resolve_device(DevicePolicy("cpu")),
                             tmp_path_factory.mktemp("cfg"))
    return loaded.clip


def run_encoder(clip: ClipHandle, ids: list[int], layer: int = -1) -> torch.Tensor:
    with torch.inference_mode():
        out = clip.encoders[0].model(torch.tensor([ids]), output_hidden_states=True)
        if layer == -1:
            return out.last_hidden_state[0]
        return clip.encoders[0].model.final_layer_norm(out.hidden_states[layer])[0]


def padded(clip: ClipHandle, text: str) -> list[int]:
    return clip.encoders[0].tokenizer(text, padding="max_length", max_length=77).input_ids


def test_plain_prompt_is_the_encoder_output(clip: ClipHandle) -> None:
    z, pooled = encode_text(clip, "a photo of a cat")
    torch.testing.assert_close(z[0], run_encoder(clip, padded(clip, "a photo of a cat")))
    assert pooled.shape == (1, clip.encoders[0].model.config.hidden_size)


def test_weight_moves_the_token_away_from_the_empty_prompt(clip: ClipHandle) -> None:
    z, _ = encode_text(clip, "a (cat:1.5)")
    plain = run_encoder(clip, padded(clip, "a cat"))
    empty = run_encoder(clip, padded(clip, ""))
    cat = 2  # BOS, "a", "cat"
    torch.testing.assert_close(z[0, cat], empty[cat] + 1.5 * (plain[cat] - empty[cat]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[0, 1], plain[1], rtol=1e-5, atol=1e-5)  # weight 1 unchanged
    same, _ = encode_text(clip, "a (cat:1.0)")
    torch.testing.assert_close(same[0], plain, rtol=1e-5, atol=1e-5)


def test_long_prompts_concatenate_windows(clip: ClipHandle) -> None:
    z, _ = encode_text(clip, " ".join(["cat"] * 100))
    assert z.shape == (1, 154, clip.encoders[0].model.config.hidden_size)
    torch.testing.assert_close(z[0, :77], run_encoder(clip, padded(clip, " ".join(["cat"] * 75))))


def test_empty_prompt_is_allowed(clip: ClipHandle) -> None:
    z, _ = encode_text(clip, "")
    torch.testing.assert_close(z[0], run_encoder(clip, padded(clip, "")))


def test_clip_skip_reads_the_penultimate_layer_through_the_final_norm(clip: ClipHandle) -> None:
    skipped = dataclasses.replace(clip, layer=-2)
    z, _ = encode_text(skipped, "a photo of a cat")
    torch.testing.assert_close(z[0], run_encoder(clip, padded(clip, "a photo of a cat"), layer=-2))
    assert not torch.allclose(z, encode_text(clip, "a photo of a cat")[0])


def test_embedding_vectors_take_the_place_of_tokens(clip: ClipHandle, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    enc = clip.encoders[0]
    ids = enc.tokenizer("red cat", add_special_tokens=False).input_ids
    table = enc.model.get_input_embeddings().weight.detach()
    save_file({"emb_params": table[ids].clone()}, str(tmp_path / "redcat.safetensors"))
    with_folder = dataclasses.replace(clip, embeddings_dir=tmp_path)
    via_embedding, _ = encode_text(with_folder, "a photo of embedding:redcat")
    as_text, _ = encode_text(clip, "a photo of red cat")
    torch.testing.assert_close(via_embedding, as_text)
    weighted, _ = encode_text(with_folder, "a photo of (embedding:redcat:1.3)")
    torch.testing.assert_close(weighted, encode_text(clip, "a photo of (red cat:1.3)")[0])


def test_missing_or_foreign_embeddings_are_named(clip: ClipHandle, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tui_diffusion.pipeline.errors import NodeError

    with_folder = dataclasses.replace(clip, embeddings_dir=tmp_path)
    with pytest.raises(NodeError, match="embedding 'nothere' not found"):
        encode_text(with_folder, "embedding:nothere")
    save_file({"emb_params": torch.zeros(2, 1280)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(NodeError, match=r"wide.safetensors: its vectors are \[1280\] wide"):
        encode_text(with_folder, "embedding:wide")

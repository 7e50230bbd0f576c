"""CLIP vision, style models (Flux Redux) and unCLIP (issue 16 item 5) on tiny random-weight files in the layouts
they are published in: the encoder's outputs equal transformers' model on the same weights, Redux appends the
image's tokens with its strength, unCLIP conditioning reaches the UNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dit_helpers import CPU
from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline import checkpoint_writer_vision as w
from tui_diffusion.pipeline.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    load_clip_vision,
    preprocess,
)

SIZES = w.TinyVision()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Two images of another size and shape than the encoder's (so scaling and cropping happen)."""
    return torch.rand(2, 40, 50, 3, generator=torch.Generator().manual_seed(0))


# -- CLIPVisionLoader / CLIPVisionEncode ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "hf-bare", "openclip"])
def test_clip_vision_encoding_equals_transformers(tmp_path: Path, image: torch.Tensor, layout: str) -> None:
    """Each file layout loads into the same model: last and penultimate hidden states and image embeddings equal
    CLIPVisionModelWithProjection's on the same pixels."""
    model = w.build_clip_vision(SIZES, seed=1)
    path = w.save(w.clip_vision_keys(model, layout), tmp_path / "clip_vision_h.safetensors")
    vision = load_clip_vision(path, CPU)
    assert (vision.config.kind, vision.config.image_size, vision.config.layers) == ("clip", 28, 3)
    out = vision.encode(image, crop=True)
    with torch.no_grad():
        ref = model(pixel_values=preprocess(image, 28, CLIP_MEAN, CLIP_STD, True), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, ref.hidden_states[-2])
    torch.testing.assert_close(out.image_embeds, ref.image_embeds)
    assert out.image_embeds.shape == (2, SIZES.projection_dim)
    assert out["image_embeds"] is out.image_embeds  # ComfyUI's item access


def test_siglip_encoding_equals_transformers(tmp_path: Path, image: torch.Tensor) -> None:
    """SigLIP (Redux's encoder, ``vision_model.*`` keys): 0.5 mean/std, no class token, the last hidden state after
    the final norm, and image_embeds the normed tokens (ComfyUI has no projection for SigLIP)."""
    model = w.build_siglip_vision(SIZES, seed=2)
    path = w.save(w.siglip_keys(model), tmp_path / "sigclip_vision_patch14_384.safetensors")
    vision = load_clip_vision(path, CPU)
    assert vision.config.kind == "siglip" and vision.config.mean == SIGLIP_MEAN
    out = vision.encode(image, crop=False)
    with torch.no_grad():
        ref = model(pixel_values=preprocess(image, 28, SIGLIP_MEAN, SIGLIP_STD, False), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(out.penultimate_hidden_states, ref.hidden_states[-2])
    assert out.last_hidden_state.shape == (2, 16, SIZES.width)
    torch.testing.assert_close(out.image_embeds, out.last_hidden_state)


def test_preprocess_crop_center_and_none() -> None:
    """ComfyUI's clip_preprocess: "center" scales the short side and cuts the middle; "none" squashes. A wide
    image, white in its outer quarters and black in the middle half, shows which one happened."""
    img = torch.zeros(1, 20, 40, 3)
    img[:, :, :10] = img[:, :, 30:] = 1.0
    centre = preprocess(img, 10, (0.0,) * 3, (1.0,) * 3, crop=True)
    squashed = preprocess(img, 10, (0.0,) * 3, (1.0,) * 3, crop=False)
    assert centre.shape == squashed.shape == (1, 3, 10, 10)
    assert float(centre[..., 3:7].max()) < 0.02  # the middle half, black (only its edges see the blur)
    assert float(squashed[..., :2].min()) > 0.9 and float(squashed[..., -2:].min()) > 0.9  # both white quarters
    # at the encoder's size nothing is resized; values are quantised to 8 bits
    same = torch.rand(1, 10, 10, 3)
    torch.testing.assert_close(preprocess(same, 10, (0.0,) * 3, (1.0,) * 3), (same * 255).round().movedim(-1, 1) / 255)


def test_not_an_image_encoder_is_a_clear_error(tmp_path: Path) -> None:
    path = w.save({"something.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: no CLIP vision"):
        load_clip_vision(path, CPU)
    pickle = tmp_path / "clip.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="refused"):
        load_clip_vision(pickle, CPU)

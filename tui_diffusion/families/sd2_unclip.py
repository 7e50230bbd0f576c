"""SD2.1 unCLIP (ViT-H and ViT-L): SD2.x's v-prediction UNet with a projection class embedding that takes an image's
CLIP embedding, noise-augmented, beside the text (ComfyUI's ``SD21UNCLIP``).

Files: SD2.x's layout plus the class embedding (``model.diffusion_model.label_emb.0.*``, 2048 inputs for ViT-H:
the noised 1024-wide embedding and its noise level's embedding), the image encoder in open_clip's layout under
``embedder.model.visual.`` and the augmentor's statistics ``noise_augmentor.data_mean``/``data_std``.
``unCLIPCheckpointLoader`` gives its CLIP_VISION as well (``pipeline/nodes_vision.py``). unCLIPConditioning's
entries become the UNet's class labels (``pipeline/clip_vision.resolve_unclip``); without one the UNet gets zeros,
as in ComfyUI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tui_diffusion.families.base import Header, shape
from tui_diffusion.families.sd1 import UNET
from tui_diffusion.families.sd2 import SD2Family
from tui_diffusion.modelfiles.header import TensorInfo

CLASS_EMBED = UNET + "label_emb.0.0.weight"
AUGMENTOR = "noise_augmentor."


class SD2UnclipFamily(SD2Family):
    id = "sd2-unclip"
    label = "SD2.1 unCLIP"
    prediction_from_weights = False  # always v-prediction

    def matches(self, header: Header) -> bool:
        return super().matches(header) and CLASS_EMBED in header

    def prediction(self, header: Mapping[str, TensorInfo], tensor: Any) -> str:
        return "v_prediction"

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
        # SD2.x's configs from the rest (the shared UNet reader takes a class embedding for SDXL's added one)
        rest = {k: v for k, v in header.items() if not k.startswith(UNET + "label_emb.")}
        configs = super().configs(rest, file, prediction)
        unet = dict(configs["unet/config.json"])
        unet["class_embed_type"] = "projection"
        unet["projection_class_embeddings_input_dim"] = int(shape(header, CLASS_EMBED)[1])
        return {**configs, "unet/config.json": unet}

    def load_checkpoint(self, path: Path, header: Mapping[str, TensorInfo], tensor: Any, device: Any,
                        config_cache: Path) -> Any:
        from tui_diffusion.pipeline.clip_vision import NoiseAugmentor

        loaded = super().load_checkpoint(path, header, tensor, device, config_cache)
        dim = int(loaded.model.unet.config.projection_class_embeddings_input_dim) // 2
        stats = [tensor(AUGMENTOR + k).float() if AUGMENTOR + k in header else None for k in ("data_mean", "data_std")]
        loaded.model.unet.unclip_noise_augmentor = NoiseAugmentor(dim, *stats)
        return loaded

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        kwargs = super().model_kwargs(model, entries, batch=batch, latent_shape=latent_shape, negative=negative,
                                      device=device, dtype=dtype)
        width = int(model.unet.config.projection_class_embeddings_input_dim)
        adm = [extras.get("unclip_adm") for _, extras in entries]
        kwargs["class_labels"] = torch.cat([(a if a is not None else torch.zeros(1, width)).reshape(1, width)
                                            .expand(batch, -1) for a in adm]).to(device, dtype)
        return kwargs


SD2_UNCLIP = SD2UnclipFamily()

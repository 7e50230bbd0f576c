"""SDXL base (CLIP-L and OpenCLIP bigG, size conditioning) and the SDXL refiner (bigG alone, aesthetic score)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.families.sd1 import UNetFamily
from tui_diffusion.modelfiles.header import TensorInfo

SDXL_TEXT_L = "conditioner.embedders.0.transformer."
SDXL_TEXT_G = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_G = "conditioner.embedders.0.model."

SDXL_LATENT = LatentFormat(
    channels=4, scale_factor=0.13025,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                 (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
    taesd_decoder="taesdxl_decoder",
)


class SDXLFamily(UNetFamily):
    id = "sdxl"
    label = "SDXL base"
    template = "sdxl-base"
    latent_format = SDXL_LATENT
    text_prefixes = (SDXL_TEXT_L, SDXL_TEXT_G)
    text_encoders = ("clip_l", "clip_g")
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    clip_layer = -2
    inpaint = None  # the inpainting variant (9 input channels) is the same family here
    #: the size numbers after the pooled text: original size, crop, target size (the refiner: 5, with a score)
    size_numbers = 6

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
        from tui_diffusion.modelfiles.configs import sdxl_configs

        return sdxl_configs(header, file)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def make_clip(self, pipe: Any, device: Any) -> Any:
        from tui_diffusion.pipeline.models import ClipHandle, TextEncoder

        encoders = [TextEncoder(pipe.tokenizer, pipe.text_encoder, norm_hidden=False),
                    TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, norm_hidden=False, pooled=True)]
        return ClipHandle(encoders, device, layer=self.clip_layer)

    def pooled_width(self, model: Any) -> int:
        config = model.unet.config
        return config.projection_class_embeddings_input_dim - self.size_numbers * config.addition_time_embed_dim

    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        from tui_diffusion.pipeline.errors import NodeError

        super().check_conditioning(model, entries)
        want = self.pooled_width(model)
        for _, extras in entries:
            pooled = extras.get("pooled_output")
            if pooled is None or pooled.shape[-1] != want:
                raise NodeError(f"an SDXL model needs conditioning from an SDXL CLIP (pooled output of width {want})")

    def size_conditioning(self, extras: dict, latent_shape: tuple, negative: bool) -> list[float]:
        """SDXL's size numbers; by default the image size, as ComfyUI derives it from the latent."""
        height = extras.get("height", latent_shape[-2] * 8)
        width = extras.get("width", latent_shape[-1] * 8)
        return [height, width, extras.get("crop_h", 0), extras.get("crop_w", 0),
                extras.get("target_height", height), extras.get("target_width", width)]

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        kwargs = super().model_kwargs(model, entries, batch=batch, latent_shape=latent_shape, negative=negative,
                                      device=device, dtype=dtype)
        pooled = [extras["pooled_output"].expand(batch, -1) for _, extras in entries]
        sizes = [torch.tensor([self.size_conditioning(extras, latent_shape, neg)]).expand(batch, -1)
                 for (_, extras), neg in zip(entries, negative, strict=True)]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat(pooled).to(device, dtype),
                                       "time_ids": torch.cat(sizes).to(device, dtype)}
        return kwargs


class SDXLRefinerFamily(SDXLFamily):
    id = "sdxl-refiner"
    label = "SDXL refiner"
    template = "sdxl-refiner"
    text_prefixes = (SDXL_REFINER_TEXT_G,)
    text_encoders = ("clip_g",)
    modelspec_architecture = "stable-diffusion-xl-v1-refiner"
    size_numbers = 5

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
        from tui_diffusion.modelfiles.configs import sdxl_refiner_configs

        return sdxl_refiner_configs(header, file)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline

    def make_clip(self, pipe: Any, device: Any) -> Any:
        from tui_diffusion.pipeline.models import ClipHandle, TextEncoder

        encoders = [TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, norm_hidden=False, pooled=True)]
        return ClipHandle(encoders, device, layer=self.clip_layer)

    def size_conditioning(self, extras: dict, latent_shape: tuple, negative: bool) -> list[float]:
        """The refiner takes an aesthetic score instead of the target size (ComfyUI: 6, and 2.5 for negatives)."""
        height = extras.get("height", latent_shape[-2] * 8)
        width = extras.get("width", latent_shape[-1] * 8)
        score = extras.get("aesthetic_score", 2.5 if negative else 6.0)
        return [height, width, extras.get("crop_h", 0), extras.get("crop_w", 0), score]


SDXL = SDXLFamily()
SDXL_REFINER = SDXLRefinerFamily()

"""SD1.x (and what every UNet family shares): CLIP ViT-L text, a 4-channel VAE, an eps UNet.

``UNetFamily`` holds what SD1.x, SD2.x and SDXL have in common: files in the LDM key layout
(``model.diffusion_model.*``), built with diffusers' ``from_single_file`` from a config folder derived
from the tensor shapes, a UNet called with ``encoder_hidden_states``, discrete (eps or v) model sampling
from the checkpoint's betas, and inpainting variants with 5 extra input channels (mask, masked image).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tui_diffusion.families.base import Family, Header, LatentFormat, has_prefix, shape
from tui_diffusion.modelfiles.header import TensorInfo

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
CONV_IN = UNET + "input_blocks.0.0.weight"
#: CosXL's marker tensors: an EDM v-prediction model and its sigma range
EDM_SIGMA_MAX = "edm_vpred.sigma_max"
EDM_SIGMA_MIN = "edm_vpred.sigma_min"

SD1_LATENT = LatentFormat(
    channels=4, scale_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                 (-0.2120, -0.2616, -0.7177)),
    taesd_decoder="taesd_decoder",
)

# The latent of a mid-grey image ("nothing here") per channel, in the model's latent space: what ComfyUI
# gives an inpainting model's masked-image input when the latent carries no mask.
BLANK_INPAINT = (0.8223, -0.6876, 0.6364, 0.1380)


def in_channels(header: Header) -> int | None:
    conv_in = shape(header, CONV_IN)
    return conv_in[1] if conv_in else None


class UNetFamily(Family):
    """A family whose denoiser is diffusers' ``UNet2DConditionModel`` loaded from an LDM-layout file."""

    latent_format = SD1_LATENT
    #: the shipped config folder (``tui_diffusion/configs/<name>``) that gives what shapes cannot tell
    template = "sd15"
    #: the text tower's key prefix in a single file (detection)
    text_prefixes: tuple[str, ...] = ()
    #: the inpainting variant: 9 input channels (4 latent, 1 mask, 4 masked image); None: either
    inpaint: bool | None = False
    #: the CLIP hidden layer read by default (-1: the last; -2: the penultimate)
    clip_layer = -1

    def matches(self, header: Header) -> bool:
        if not has_prefix(header, UNET) or not has_prefix(header, *self.text_prefixes):
            return False
        return self.inpaint is None or (in_channels(header) == 9) == self.inpaint

    # -- building ------------------------------------------------------------------------------------
    def prediction(self, header: Mapping[str, TensorInfo], tensor: Any) -> str:
        """epsilon or v_prediction; SD1.x is always epsilon."""
        return "epsilon"

    def configs(self, header: Mapping[str, TensorInfo], file: str, prediction: str) -> dict[str, dict[str, Any]]:
        """The diffusers config folder's files (path -> JSON) for this file's sizes."""
        from tui_diffusion.modelfiles.configs import sd1_configs

        return sd1_configs(header, file)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def make_clip(self, pipe: Any, device: Any) -> Any:
        from tui_diffusion.pipeline.models import ClipHandle, TextEncoder

        return ClipHandle([TextEncoder(pipe.tokenizer, pipe.text_encoder)], device, layer=self.clip_layer)

    def load_checkpoint(self, path: Path, header: Mapping[str, TensorInfo], tensor: Any, device: Any,
                        config_cache: Path) -> Any:
        from tui_diffusion.modelfiles.configs import write_config_folder
        from tui_diffusion.pipeline.models import load_single_file_pipeline

        folder = write_config_folder(self.configs(header, str(path), self.prediction(header, tensor)), config_cache)
        loaded = load_single_file_pipeline(self, path, folder, device)
        if EDM_SIGMA_MAX in header:  # CosXL: EDM v-prediction with the file's sigma range, as ComfyUI reads it
            low = float(tensor(EDM_SIGMA_MIN).float().reshape(-1)[0]) if EDM_SIGMA_MIN in header else 0.002
            loaded.model.scheduler_config["edm_vpred"] = [low, float(tensor(EDM_SIGMA_MAX).float().reshape(-1)[0])]
        return loaded

    def default_model_sampling(self, model: Any) -> Any:
        from tui_diffusion.pipeline.model_sampling import DiscreteSampling, EDMSampling

        edm = model.scheduler_config.get("edm_vpred")
        if edm:
            return EDMSampling("v", sigma_min=edm[0], sigma_max=edm[1])
        return DiscreteSampling.from_scheduler_config(model.scheduler_config)

    # -- conditioning -> UNet call -----------------------------------------------------------------------
    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        from tui_diffusion.pipeline.errors import NodeError

        width = model.unet.config.cross_attention_dim
        for emb, _ in entries:
            if emb.shape[-1] != width:
                raise NodeError(f"the conditioning is {emb.shape[-1]} wide but this model takes {width}: encode "
                                "the prompts with this checkpoint's CLIP")

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        contexts = common_length([emb for emb, _ in entries])
        kwargs = {"encoder_hidden_states": torch.cat([c.to(device, dtype).expand(batch, -1, -1) for c in contexts])}
        channels = self.latent_format.channels
        if model.unet.config.in_channels == 2 * channels and any(
                extras.get("concat_latent_image") is not None for _, extras in entries):
            images = [self.ip2p_image(model, extras.get("concat_latent_image"), batch, latent_shape)
                      for _, extras in entries]
            kwargs["ip2p_concat"] = torch.cat(images).to(device, dtype)
        return kwargs

    def ip2p_image(self, model: Any, image: Any, batch: int, latent_shape: tuple) -> Any:
        """An InstructPix2Pix model's second input for one conditioning entry (InstructPixToPixConditioning's
        ``concat_latent_image``): resized to the latent, to the batch; unscaled as diffusers' IP2P models read it,
        scaled into the model's latent space for CosXL's EDM edit model (ComfyUI's ``process_ip2p_image_in``)."""
        import torch
        import torch.nn.functional as F

        from tui_diffusion.pipeline.model_sampling import EDMSampling

        shape = (batch, self.latent_format.channels, *latent_shape[-2:])
        if image is None:
            return torch.zeros(shape)
        image = image.float().cpu()
        if tuple(image.shape[-2:]) != tuple(latent_shape[-2:]):
            image = F.interpolate(image, size=tuple(latent_shape[-2:]), mode="bilinear", align_corners=False)
        image = image.repeat(-(-batch // image.shape[0]), 1, 1, 1)[:batch]
        if isinstance(self.default_model_sampling(model), EDMSampling):
            image = self.latent_format.process_in(image)
        return image

    def extra_channels(self, model: Any, latent_in: Any, mask: Any) -> Any:
        import torch

        from tui_diffusion.pipeline.errors import NodeError

        extra = model.unet.config.in_channels - latent_in.shape[1]
        if extra <= 0:
            return None
        if extra == latent_in.shape[1]:  # InstructPix2Pix: zeros where no conditioning brings an image (ComfyUI)
            return torch.zeros_like(latent_in)
        if extra != 5:
            raise NodeError(f"a UNet with {model.unet.config.in_channels} input channels is not an inpainting "
                            "model this sampler knows")
        if mask is None:
            blank = torch.tensor(BLANK_INPAINT, dtype=latent_in.dtype, device=latent_in.device).reshape(1, 4, 1, 1)
            return torch.cat([torch.ones_like(latent_in[:, :1]), blank.expand_as(latent_in)], dim=1)
        return torch.cat([mask[:, :1].to(latent_in), latent_in], dim=1)

    def control_kwargs(self, model: Any, residuals: dict[str, list[Any]]) -> dict[str, Any]:
        """diffusers' UNet takes ControlNet outputs as down/mid residuals and T2I-Adapter features as
        intra-block residuals (a fresh list: the UNet consumes it)."""
        out: dict[str, Any] = {}
        if residuals.get("down"):
            out["down_block_additional_residuals"] = tuple(residuals["down"])
            out["mid_block_additional_residual"] = residuals["mid"][0]
        if residuals.get("intra"):
            out["down_intrablock_additional_residuals"] = list(residuals["intra"])
        return out

    def checkpoint_state(self, model: Any, clip: Any) -> dict[str, Any]:
        """The UNet under ``model.diffusion_model.`` and the text encoders under ``text_prefixes`` (the LDM/SGM
        layout); a family without text encoders in its files (Lotus) is not written."""
        if not self.text_prefixes:
            return super().checkpoint_state(model, clip)
        from tui_diffusion.pipeline.checkpoint_save import unet_checkpoint_state

        return unet_checkpoint_state(model, clip, self.text_prefixes)

    def apply_model(self, model: Any, x: Any, timestep: Any, kwargs: dict[str, Any]) -> Any:
        from tui_diffusion.pipeline.models import unet_call

        concat = kwargs.pop("ip2p_concat", None)
        if concat is not None:  # each entry's own image beside the noisy latent (InstructPix2Pix)
            import torch

            x = torch.cat([x[:, : x.shape[1] - concat.shape[1]], concat], dim=1)
        unet = unet_call(model.unet, any(p.strength != 0.0 for p in model.patches))
        return unet(x, timestep, return_dict=False, **kwargs)[0]


def common_length(embeddings: list[Any]) -> list[Any]:
    """Repeat prompts of different window counts to a common length, as ComfyUI does."""
    lengths = {e.shape[1] for e in embeddings}
    if len(lengths) == 1:
        return embeddings
    lcm = math.lcm(*lengths)
    return [e.repeat(1, lcm // e.shape[1], 1) for e in embeddings]


class SD1Family(UNetFamily):
    id = "sd1"
    label = "SD1.x"
    text_prefixes = (SD1_TEXT,)
    text_encoders = ("clip_l",)


class SD1InpaintFamily(SD1Family):
    id = "sd1-inpaint"
    label = "SD1.x inpainting"
    inpaint = True


SD1 = SD1Family()
SD1_INPAINT = SD1InpaintFamily()

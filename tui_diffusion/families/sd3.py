"""SD3 and SD3.5 (medium, large, large turbo): an MMDiT transformer, CLIP-L + CLIP-G + optional T5-XXL, a 16-channel
VAE, rectified-flow sampling with shift 3.0 (timestep = sigma x 1000).

Files: Stability's transformer keys (``joint_blocks.*``, under ``model.diffusion_model.`` in their files), alone in
``diffusion_models/`` or in an all-in-one checkpoint with the VAE under ``first_stage_model.`` and the text encoders
under ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``. Loading lives in ``pipeline/models_dit.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tui_diffusion.families.base import Family, Header, LatentFormat
from tui_diffusion.modelfiles.convert_dit import SD3_KEY, model_prefix
from tui_diffusion.modelfiles.header import TensorInfo

SD3_LATENT = LatentFormat(
    channels=16, scale_factor=1.5305, shift_factor=0.0609,
    rgb_factors=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
                 (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
                 (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
                 (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
                 (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
                 (-0.1448, -0.1463, -0.1189)),
    rgb_bias=(0.2394, 0.2135, 0.1925),
    taesd_decoder="taesd3_decoder",
)
#: ComfyUI's SD3 model sampling: discrete flow, shift 3.0, timestep = sigma x 1000
SD3_SHIFT = 3.0


def pad_to_patch(x: Any, patch: int) -> Any:
    """Pad height and width up to a multiple of the patch size, wrapping around as ComfyUI does."""
    import torch

    h, w = x.shape[-2:]
    ph, pw = (-h) % patch, (-w) % patch
    if not ph and not pw:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="circular")


def to_model_dtype(net: Any, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The input and floating arguments in the network's own dtype (T5 and Flux run in bf16 where the device's
    dtype is fp16)."""
    dtype = net.dtype
    return x.to(dtype), {k: v.to(dtype) if getattr(v, "is_floating_point", lambda: False)() and k != "guidance"
                         else v for k, v in kwargs.items()}


def batched(entries: list[tuple[Any, dict]], batch: int, width: int | None, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The contexts (repeated to a common length, zero-padded to ``width``) and pooled vectors of a batched call."""
    import torch

    from tui_diffusion.families.sd1 import common_length
    from tui_diffusion.pipeline.errors import NodeError

    contexts = common_length([emb for emb, _ in entries])
    if width is not None:
        if any(c.shape[-1] > width for c in contexts):
            raise NodeError(f"the conditioning is wider than this model's context ({width}): encode the prompts "
                            "with this model's text encoders")
        contexts = [torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in contexts]
    context = torch.cat([c.to(device, dtype).expand(batch, -1, -1) for c in contexts])
    pooled = torch.cat([extras["pooled_output"].to(device, dtype).expand(batch, -1) for _, extras in entries])
    return context, pooled


class DiTFamily(Family):
    """What SD3 and Flux share: transformer files recognised by a probe key, loaded by ``models_dit``."""

    probe = ""
    #: the text encoders a checkpoint of this family must hold (the others of ``text_encoders`` may be absent)
    required_text_encoders: tuple[str, ...] = ()

    def matches(self, header: Header) -> bool:
        return model_prefix(header, self.probe) is not None

    def load_checkpoint(self, path: Path, header: Mapping[str, TensorInfo], tensor: Any, device: Any,
                        config_cache: Path) -> Any:
        from tui_diffusion.pipeline.models_dit import load_dit_checkpoint

        return load_dit_checkpoint(path, header, device, config_cache)

    def original_keys(self, state: dict[str, Any], config: Any, prefix: str) -> dict[str, Any]:
        """diffusers' transformer tensors under the names of the family's published files, after ``prefix``."""
        raise NotImplementedError(f"{self.label}: no original layout")

    def checkpoint_state(self, model: Any, clip: Any) -> dict[str, Any]:
        """ComfyUI's all-in-one layout: the transformer's original keys under ``model.diffusion_model.``, each
        text encoder under ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``."""
        from tui_diffusion.pipeline.checkpoint_save import dit_checkpoint_state

        return dit_checkpoint_state(model, clip, self)

    def pooled_width(self, model: Any) -> int:
        return int(model.unet.config.pooled_projection_dim)

    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        from tui_diffusion.pipeline.errors import NodeError

        want = self.pooled_width(model)
        for _, extras in entries:
            pooled = extras.get("pooled_output")
            if pooled is None or pooled.shape[-1] != want:
                got = "none" if pooled is None else f"width {pooled.shape[-1]}"
                raise NodeError(f"a {self.label} model needs conditioning from its own text encoders (pooled "
                                f"output of width {want}; got {got})")


class SD3Family(DiTFamily):
    id = "sd3"
    label = "SD3/SD3.5"
    latent_format = SD3_LATENT
    text_encoders = ("clip_l", "clip_g", "t5xxl")
    probe = SD3_KEY
    #: what ComfyUI writes for every SD3/SD3.5 model (its own TODO: the other variants' names)
    modelspec_architecture = "stable-diffusion-v3-medium"

    def original_keys(self, state: dict[str, Any], config: Any, prefix: str) -> dict[str, Any]:
        from tui_diffusion.pipeline.checkpoint_writer_dit import sd3_to_original

        return sd3_to_original(state, int(config.num_layers), prefix)

    def default_model_sampling(self, model: Any) -> Any:
        from tui_diffusion.pipeline.model_sampling import DiscreteFlowSampling

        return DiscreteFlowSampling(shift=SD3_SHIFT, multiplier=1000.0)

    def control_kwargs(self, model: Any, residuals: dict[str, list[Any]]) -> dict[str, Any]:
        """SD3 ControlNets' residuals, one per joint block (``pipeline/controlnet.py`` sums them)."""
        from tui_diffusion.pipeline.controlnet import sd3_block_kwargs

        dtype = model.unet.dtype
        return sd3_block_kwargs(model.unet, [r.to(dtype) for r in residuals.get("dit_blocks", [])])

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        context, pooled = batched(entries, batch, int(model.unet.config.joint_attention_dim), device, dtype)
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    def apply_model(self, model: Any, x: Any, timestep: Any, kwargs: dict[str, Any]) -> Any:
        net = model.unet
        h, w = x.shape[-2:]
        x, kwargs = to_model_dtype(net, x, kwargs)
        x = pad_to_patch(x, int(net.config.patch_size))
        t = timestep.reshape(-1).to(x.dtype).expand(x.shape[0]) if timestep.numel() == 1 else timestep.to(x.dtype)
        out = net(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]
        return out[..., :h, :w]


SD3 = SD3Family()

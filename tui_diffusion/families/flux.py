"""Flux.1 (dev, schnell, and the variants with the same transformer): CLIP-L's pooled output and T5-XXL's tokens,
a 16-channel VAE, Flux's flow sampling (the network is given sigma; dev shift 1.15, schnell 1.0) and, for dev,
an embedded guidance value (FluxGuidance; 3.5 unless set).

Files: Black Forest Labs' keys (``double_blocks.*``/``single_blocks.*``, no prefix) in ``diffusion_models/``, or an
all-in-one checkpoint with the transformer under ``model.diffusion_model.``, the VAE under ``vae.`` and the text
encoders under ``text_encoders.<clip_l|t5xxl>.transformer.``. Loading lives in ``pipeline/models_dit.py``.
"""

from __future__ import annotations

from typing import Any

from tui_diffusion.families.base import LatentFormat
from tui_diffusion.families.sd3 import DiTFamily, batched, pad_to_patch, to_model_dtype
from tui_diffusion.modelfiles.convert_dit import FLUX_KEY

FLUX_LATENT = LatentFormat(
    channels=16, scale_factor=0.3611, shift_factor=0.1159,
    rgb_factors=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                 (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                 (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                 (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                 (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                 (-0.1262, -0.0982, -0.0778)),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
    taesd_decoder="taef1_decoder",
)
#: ComfyUI's defaults: Flux dev's model sampling shift, schnell's, and the guidance dev embeds unless told
DEV_SHIFT, SCHNELL_SHIFT, DEFAULT_GUIDANCE = 1.15, 1.0, 3.5


def pack(x: Any) -> Any:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: 2x2 patches as tokens, channels then rows then columns."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Any, h: int, w: int) -> Any:
    b, _, cp = tokens.shape
    c = cp // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Flux's positions of the image tokens: (0, row, column) for each 2x2 patch."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily(DiTFamily):
    id = "flux"
    label = "Flux.1"
    latent_format = FLUX_LATENT
    text_encoders = ("clip_l", "t5xxl")
    probe = FLUX_KEY

    def check_conditioning(self, model: Any, entries: list[tuple[Any, dict]]) -> None:
        """Flux's context is T5's tokens: conditioning of another width (CLIP hidden states) is refused."""
        from tui_diffusion.pipeline.errors import NodeError

        super().check_conditioning(model, entries)
        width = int(model.unet.config.joint_attention_dim)
        for emb, _ in entries:
            if emb.shape[-1] != width:
                raise NodeError(f"a Flux model takes T5's tokens ({width} wide) as its context, not {emb.shape[-1]}: "
                                "encode the prompts with Flux's text encoders (DualCLIPLoader, type flux)")

    def default_model_sampling(self, model: Any) -> Any:
        from tui_diffusion.pipeline.model_sampling import FluxSampling

        return FluxSampling(shift=DEV_SHIFT if model.unet.config.guidance_embeds else SCHNELL_SHIFT)

    def model_kwargs(self, model: Any, entries: list[tuple[Any, dict]], *, batch: int, latent_shape: tuple,
                     negative: list[bool], device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        context, pooled = batched(entries, batch, int(model.unet.config.joint_attention_dim), device, dtype)
        kwargs = {"encoder_hidden_states": context, "pooled_projections": pooled,
                  "txt_ids": torch.zeros(context.shape[1], 3, device=device, dtype=dtype)}
        if model.unet.config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([float(extras.get("guidance", DEFAULT_GUIDANCE))
                                               for _, extras in entries for _ in range(batch)],
                                              device=device, dtype=torch.float32)
        return kwargs

    def apply_model(self, model: Any, x: Any, timestep: Any, kwargs: dict[str, Any]) -> Any:
        net = model.unet
        h, w = x.shape[-2:]
        x, kwargs = to_model_dtype(net, x, kwargs)
        x = pad_to_patch(x, 2)
        hp, wp = x.shape[-2:]
        t = timestep.reshape(-1).to(x.dtype)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        out = net(hidden_states=pack(x), timestep=t, img_ids=image_ids(hp, wp, x.device, x.dtype),
                  return_dict=False, **kwargs)[0]
        return unpack(out, hp, wp)[..., :h, :w]


FLUX = FluxFamily()

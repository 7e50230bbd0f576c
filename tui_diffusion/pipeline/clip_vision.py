"""CLIP vision encoders, style models and unCLIP's noise augmentation, as ComfyUI uses them.

An image encoder file (``models/clip_vision``) holds one of:

- an OpenAI/LAION CLIP vision tower in transformers' ``CLIPVisionModelWithProjection`` key names (ViT-L/14,
  ViT-H/14, ViT-bigG/14 for SDXL revision), with or without the ``vision_model.`` level;
- the same tower in open_clip's layout (``visual.transformer.resblocks.*``; also inside SD2.1 unCLIP checkpoints
  under ``embedder.model.visual.``), converted here;
- a SigLIP vision tower (``SiglipVisionModel`` keys; Flux Redux's ``sigclip_vision_patch14_384.safetensors``).

The transformers configuration is built from the tensor shapes (width, depth, MLP size, patch, image size from
the position embeddings); what shapes cannot tell follows the published models: 16 heads for the real widths (12
for ViT-B's 768; one head per 16 channels for the tiny test models), quick-GELU for OpenAI's ViT-L (width 1024),
GELU for the LAION towers, tanh-GELU and layer-norm eps 1e-6 for SigLIP. Nothing is downloaded.

Encoding follows ComfyUI's ``clip_preprocess`` and ``ClipVisionModel.encode_image``: the image is scaled
(bicubic, antialiased) so its short side is the encoder's size and centre-cropped (``crop="center"``) or squashed
to a square (``"none"``), quantised to 8 bits, normalised with the model's mean/std (OpenAI's for CLIP, 0.5 for
SigLIP). The output holds ``last_hidden_state`` (CLIP: the last layer before the final norm; SigLIP: after it),
``penultimate_hidden_states`` (unCLIP/revision read it), ``image_embeds`` (CLIP: the projected, normed class
token; SigLIP: the normed tokens themselves, as ComfyUI has no projection for SigLIP) and, for SigLIP, as ComfyUI
keeps them, ``all_hidden_states`` (every layer's output; USO's style projector reads three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.paths import PICKLE_SUFFIXES
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.placement import in_use, place

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

#: attention heads of the published towers by width (shapes cannot tell the head count)
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1280: 16, 1664: 16}
#: image sizes the patch grid does not give exactly: SigLIP so400m/14 at 384 px has 27 x 27 patches (the last
#: 6 pixels fall off the grid), as ComfyUI's clip_vision_siglip_384 config says
KNOWN_SIZES = {(14, 27): 384}
#: the open_clip key of a vision tower's first attention (any prefix before it)
OPENCLIP_PROBE = "transformer.resblocks.0.attn.in_proj_weight"
HF_PROBE = "embeddings.patch_embedding.weight"


def heads_for(width: int) -> int:
    """The attention heads of a tower of this width: the published models' count, else 16 channels a head."""
    return KNOWN_HEADS.get(width, max(1, width // 16))


# -- reading files ------------------------------------------------------------------------------------------------
def read_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a model file (safetensors, or a weights-only pickle when allowed)."""
    from tui_diffusion.pipeline.models import read_pickle_checkpoint

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle files ({path.suffix}) can run arbitrary code when loaded and are "
                                  "refused; use the .safetensors version, or allow them with --allow-pickle")
        return read_pickle_checkpoint(path)
    read_header(path)  # a clear error for a file that is not safetensors
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{path}: cannot read this file: {exc}") from None


def find_tower(keys: Any) -> tuple[str, str] | None:
    """("hf" or "openclip", key prefix) of the vision tower in a state dict, None when there is none."""
    for key in keys:
        if key.endswith(OPENCLIP_PROBE) and "visual" in key:
            return "openclip", key[: -len(OPENCLIP_PROBE)]
    for key in keys:
        if key.endswith(HF_PROBE):
            prefix = key[: -len(HF_PROBE)]
            if f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in keys:
                return "hf", prefix
    return None


def openclip_to_hf(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """An open_clip visual tower as transformers' vision transformer keys (no ``vision_model.`` level), and the
    projection as ``visual_projection.weight`` (open_clip multiplies by ``proj``; transformers by its transpose)."""
    out = {
        "embeddings.class_embedding": state[prefix + "class_embedding"],
        "embeddings.patch_embedding.weight": state[prefix + "conv1.weight"],
        "embeddings.position_embedding.weight": state[prefix + "positional_embedding"],
        "pre_layrnorm.weight": state[prefix + "ln_pre.weight"], "pre_layrnorm.bias": state[prefix + "ln_pre.bias"],
        "post_layernorm.weight": state[prefix + "ln_post.weight"],
        "post_layernorm.bias": state[prefix + "ln_post.bias"],
    }
    i = 0
    while f"{prefix}transformer.resblocks.{i}.attn.in_proj_weight" in state:
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{kind}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{kind}"], out[f"{dst}self_attn.k_proj.{kind}"] = q, k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.out_proj.{kind}"] = state[f"{src}attn.out_proj.{kind}"]
            out[f"{dst}layer_norm1.{kind}"] = state[f"{src}ln_1.{kind}"]
            out[f"{dst}layer_norm2.{kind}"] = state[f"{src}ln_2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.c_fc.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.c_proj.{kind}"]
        i += 1
    proj = state.get(prefix + "proj")
    return out, (proj.t().contiguous() if proj is not None else None)


def hf_tower(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A transformers-layout tower without its prefix, and its projection (``visual_projection.weight`` beside the
    ``vision_model.`` level, or at the top of the file)."""
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    tower = {k: v for k, v in tower.items() if not k.endswith("position_ids") and not k.startswith("visual_projection")}
    outer = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
    return tower, state.get(outer + "visual_projection.weight")


# -- the model ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionConfig:
    """What a vision tower is, read from its tensors."""

    kind: str  # "clip" or "siglip"
    width: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    image_size: int
    projection_dim: int | None
    use_head: bool = False

    @property
    def mean(self) -> tuple[float, float, float]:
        return SIGLIP_MEAN if self.kind == "siglip" else CLIP_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return SIGLIP_STD if self.kind == "siglip" else CLIP_STD

    @property
    def label(self) -> str:
        names = {1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14", 1152: "SigLIP so400m"}
        name = names.get(self.width, f"{self.width} wide, {self.layers} layers")
        return f"{'SigLIP' if self.kind == 'siglip' and self.width != 1152 else 'CLIP vision'} {name} " \
               f"({self.image_size}px)"

    def transformers_config(self) -> Any:
        if self.kind == "siglip":
            from transformers import SiglipVisionConfig

            return SiglipVisionConfig(
                hidden_size=self.width, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=self.use_head)
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.width, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch,
            projection_dim=self.projection_dim or self.width,
            hidden_act="quick_gelu" if self.width == 1024 else "gelu", layer_norm_eps=1e-5)


def vision_config(tower: dict[str, torch.Tensor], projection: torch.Tensor | None) -> VisionConfig:
    """The configuration of a tower from its tensor shapes."""
    patch_w = tower["embeddings.patch_embedding.weight"]
    width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    positions = int(tower["embeddings.position_embedding.weight"].shape[0])
    siglip = "embeddings.class_embedding" not in tower
    grid = math.isqrt(positions if siglip else positions - 1)
    layers = 0
    while f"encoder.layers.{layers}.mlp.fc1.weight" in tower:
        layers += 1
    if not layers or grid * grid != (positions if siglip else positions - 1) or patch_w.ndim != 4:
        raise ValueError("the tower's layers or position embeddings are not those of a ViT")
    return VisionConfig(
        kind="siglip" if siglip else "clip", width=width, layers=layers, heads=heads_for(width),
        intermediate=int(tower["encoder.layers.0.mlp.fc1.weight"].shape[0]), patch=patch,
        image_size=KNOWN_SIZES.get((patch, grid), grid * patch),
        projection_dim=int(projection.shape[0]) if projection is not None else None,
        use_head=siglip and "head.probe" in tower)


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: what ComfyUI's ``encode_image`` returns (item access as ComfyUI's ``Output`` has)."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    image_embeds: torch.Tensor
    image_sizes: list = field(default_factory=list)
    #: SigLIP only, as ComfyUI: every encoder layer's output [B, layers, tokens, width] (USOStyleReference reads
    #: three of them); None for CLIP towers
    all_hidden_states: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def preprocess(image: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
               crop: bool = True) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 -> normalised pixels [B,3,size,size], as ComfyUI's ``clip_preprocess``."""
    image = image[..., :3].float().movedim(-1, 1)
    if image.shape[-2:] != (size, size):
        if crop:
            scale = size / min(image.shape[-2:])
            target = (round(scale * image.shape[-2]), round(scale * image.shape[-1]))
        else:
            target = (size, size)
        image = torch.nn.functional.interpolate(image, size=target, mode="bicubic", antialias=True)
        top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
        image = image[:, :, top: top + size, left: left + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=image.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(1, 3, 1, 1)
    return (image - mean_t) / std_t


class ClipVisionModel:
    """CLIP_VISION: a loaded image encoder (a transformers model) and how to feed it."""

    def __init__(self, model: Any, config: VisionConfig, device: Device, source: str) -> None:
        self.model, self.config, self.device, self.source = model, config, device, source

    def encode(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        """Encode a batch of images (ComfyUI's ``encode_image``)."""
        cfg = self.config
        pixels = preprocess(image, cfg.image_size, cfg.mean, cfg.std, crop)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode(), in_use(self.model):
            out = self.model(pixel_values=pixels.to(self.device.torch_device, dtype), output_hidden_states=True)
        last = out.last_hidden_state.float().cpu()
        penultimate = out.hidden_states[-2].float().cpu()
        embeds = last if cfg.kind == "siglip" else out.image_embeds.float().cpu()
        layers = torch.stack([h.float().cpu() for h in out.hidden_states[1:]], dim=1) if cfg.kind == "siglip" \
            else None  # transformers' hidden_states start with the embeddings; ComfyUI's list does not
        return ClipVisionOutput(last, penultimate, embeds, [tuple(pixels.shape[1:])] * pixels.shape[0], layers)


def build_vision_model(config: VisionConfig) -> Any:
    """An empty transformers model of this configuration (SiglipVisionModel or CLIPVisionModelWithProjection)."""
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

    from tui_diffusion.pipeline.models import _quiet_libraries

    _quiet_libraries()
    cls = SiglipVisionModel if config.kind == "siglip" else CLIPVisionModelWithProjection
    return cls(config.transformers_config())


def vision_transformer(model: Any) -> Any:
    """The module holding the tower's own keys (transformers 5's SigLIP vision model is that module itself)."""
    return getattr(model, "vision_model", model)


def vision_from_state(state: dict[str, torch.Tensor], device: Device, source: str) -> ClipVisionModel:
    """A CLIP_VISION from a state dict holding a vision tower in any of the layouts above."""
    found = find_tower(state)
    if found is None:
        raise CheckpointError(f"{source}: no CLIP vision or SigLIP image encoder in this file (no "
                              "'vision_model.encoder.layers.*' or open_clip 'visual.transformer.*' tensors)")
    layout, prefix = found
    try:
        tower, projection = openclip_to_hf(state, prefix) if layout == "openclip" else hf_tower(state, prefix)
        config = vision_config(tower, projection)
        model = build_vision_model(config)
        inner = vision_transformer(model)
        tower = {k: v.float() for k, v in tower.items()}
        missing, unexpected = inner.load_state_dict(tower, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"tensors missing: {missing[:4]}, unexpected: {unexpected[:4]}")
        if config.kind == "clip" and projection is not None:
            model.visual_projection.weight.data.copy_(projection.float())
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{source}: not a usable image encoder: {exc}") from None
    place(model, device, device.dtype)
    return ClipVisionModel(model, config, device, source)


def read_tower_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor] | None:
    """Only the image encoder's tensors of a file that holds more (an unCLIP checkpoint); None without one."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = read_state(path, allow_pickle)
        return state if find_tower(state) is not None else None
    header = read_header(path)
    found = find_tower(header)
    if found is None:
        return None
    layout, prefix = found
    outer = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
    wanted = [k for k in header if k.startswith(prefix) or k == outer + "visual_projection.weight"]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in wanted}
    except Exception as exc:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{path}: cannot read this file: {exc}") from None


def load_clip_vision(path: Path, device: Device, allow_pickle: bool = False) -> ClipVisionModel:
    """CLIPVisionLoader: an image encoder file."""
    return vision_from_state(read_state(path, allow_pickle), device, str(path))


# -- style models (Flux Redux, the SD1.x T2I style adapter) ---------------------------------------------------------
class ReduxProjector(torch.nn.Module):
    """Flux Redux's image-to-text-token projector: SigLIP tokens -> up (3x T5 width) -> SiLU -> down (T5 width)."""

    def __init__(self, vision_width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.redux_up = torch.nn.Linear(vision_width, hidden)
        self.redux_down = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(torch.nn.functional.silu(self.redux_up(x)))


class _AdapterBlock(torch.nn.Module):
    """A residual attention block of the T2I style adapter (open_clip's: pre-norm, quick-GELU MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.ModuleDict({"c_fc": torch.nn.Linear(width, width * 4),
                                        "c_proj": torch.nn.Linear(width * 4, width)})
        self.ln_2 = torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp["c_fc"](self.ln_2(x))
        return x + self.mlp["c_proj"](h * torch.sigmoid(1.702 * h))


class T2IStyleAdapter(torch.nn.Module):
    """The SD1.x T2I-Adapter style model (coadapter-style): learned style tokens read CLIP ViT-L's last hidden state
    through a few attention blocks and are projected to the text width (ComfyUI builds it with 8 heads)."""

    def __init__(self, width: int, context_dim: int, tokens: int, layers: int, heads: int = 8) -> None:
        super().__init__()
        self.style_embedding = torch.nn.Parameter(torch.zeros(1, tokens, width))
        self.transformer_layes = torch.nn.Sequential(*[_AdapterBlock(width, heads) for _ in range(layers)])
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.proj = torch.nn.Parameter(torch.zeros(width, context_dim))

    @property
    def in_features(self) -> int:
        return int(self.style_embedding.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.style_embedding.shape[1]
        x = torch.cat([x, self.style_embedding.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = self.transformer_layes(self.ln_pre(x))
        return self.ln_post(x[:, -n:]) @ self.proj


class StyleModel:
    """STYLE_MODEL: turns a CLIP vision output into tokens appended to a prompt's (ComfyUI's ``get_cond``)."""

    def __init__(self, module: torch.nn.Module, device: Device, source: str) -> None:
        self.module, self.device, self.source = module, device, source

    @property
    def vision_width(self) -> int:
        if isinstance(self.module, T2IStyleAdapter):
            return self.module.in_features
        return int(self.module.redux_up.in_features)

    def get_cond(self, output: ClipVisionOutput) -> torch.Tensor:
        """Tokens [B, N, text width] from the encoder's last hidden state."""
        x = output.last_hidden_state
        if x.shape[-1] != self.vision_width:
            made_for = ("CLIP ViT-L/14: clip_vision_l" if isinstance(self.module, T2IStyleAdapter)
                        else "Flux Redux: sigclip_vision_patch14_384.safetensors")
            raise ValueError(f"the style model takes image tokens {self.vision_width} wide; this CLIP vision output "
                             f"is {x.shape[-1]} wide: load the image encoder it was made for ({made_for})")
        dtype = next(self.module.parameters()).dtype
        with torch.inference_mode(), in_use(self.module):
            return self.module(x.to(self.device.torch_device, dtype)).float().cpu()


def load_style_model(path: Path, device: Device, allow_pickle: bool = False) -> StyleModel:
    """StyleModelLoader: Flux Redux's projector (``redux_up``/``redux_down``) or the SD1.x T2I style adapter
    (``style_embedding``), sized from the file."""
    state = read_state(path, allow_pickle)
    module: torch.nn.Module
    try:
        if "style_embedding" in state:
            emb = state["style_embedding"]
            layers = 0
            while f"transformer_layes.{layers}.attn.in_proj_weight" in state:
                layers += 1
            module = T2IStyleAdapter(int(emb.shape[-1]), int(state["proj"].shape[1]), int(emb.shape[1]), layers)
        elif "redux_down.weight" in state and "redux_up.weight" in state:
            up, down = state["redux_up.weight"], state["redux_down.weight"]
            module = ReduxProjector(int(up.shape[1]), int(up.shape[0]), int(down.shape[0]))
        else:
            raise CheckpointError(f"{path}: not a style model (neither Flux Redux's 'redux_up'/'redux_down' nor a "
                                  "T2I style adapter's 'style_embedding')")
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, IndexError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"{path}: not a usable style model: {exc}") from None
    place(module, device, device.dtype)
    return StyleModel(module, device, str(path))


# -- unCLIP's image-embedding noise augmentation ------------------------------------------------------------------
class NoiseAugmentor:
    """ComfyUI's ``CLIPEmbeddingNoiseAugmentation``: normalise an image embedding (data mean/std), noise it to a
    level of a squared-cosine schedule, denormalise, and give the level's sinusoidal embedding beside it."""

    max_noise_level = 1000

    def __init__(self, dim: int, data_mean: torch.Tensor | None = None, data_std: torch.Tensor | None = None) -> None:
        self.dim = dim
        self.data_mean = data_mean.float().reshape(1, -1) if data_mean is not None else torch.zeros(1, dim)
        self.data_std = data_std.float().reshape(1, -1) if data_std is not None else torch.ones(1, dim)
        steps = torch.arange(self.max_noise_level + 1, dtype=torch.float64) / self.max_noise_level
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt().float()

    def level_embedding(self, level: torch.Tensor) -> torch.Tensor:
        """The noise level's sinusoidal embedding (cos half first, as ComfyUI's ``Timestep``)."""
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = level.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return torch.nn.functional.pad(emb, (0, self.dim % 2))

    def __call__(self, x: torch.Tensor, level: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x.float().cpu() - self.data_mean) / self.data_std
        if seed is None:
            noise = torch.randn(x.shape)
        else:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        z = self.sqrt_alphas_cumprod[level] * x + self.sqrt_one_minus_alphas_cumprod[level] * noise
        z = z * self.data_std + self.data_mean
        return z, self.level_embedding(torch.tensor([level])).expand(z.shape[0], -1)


def unclip_adm(unclip: list[dict], augmentor: NoiseAugmentor, merge_augment: float = 0.0,
               seed: int | None = None) -> torch.Tensor:
    """ComfyUI's ``unclip_adm``: each image's embedding noised and weighted by its strength, concatenated with
    its noise level's embedding; several are summed and noised once more at ``merge_augment`` (ComfyUI draws that
    noise unseeded; here it comes from the same seed, so that a seed gives one image)."""
    outs = []
    for entry in unclip:
        embeds = entry["clip_vision_output"].image_embeds
        if embeds.ndim != 2:
            raise ValueError("unCLIP needs a CLIP vision output with one image embedding per image (a CLIP vision "
                             "model with a projection, not SigLIP)")
        if embeds.shape[-1] != augmentor.dim:
            raise ValueError(f"the image embedding is {embeds.shape[-1]} wide but this model takes "
                             f"{augmentor.dim}: load the CLIP vision model it was trained with")
        level = round((augmentor.max_noise_level - 1) * float(entry["noise_augmentation"]))
        for row in embeds:
            z, level_emb = augmentor(row[None], level, seed)
            outs.append(torch.cat([z, level_emb], dim=1) * float(entry["strength"]))
    if len(outs) == 1:
        return outs[0]
    total = torch.stack(outs).sum(0)
    level = round((augmentor.max_noise_level - 1) * merge_augment)
    z, level_emb = augmentor(total[:, : augmentor.dim], level, seed)
    return torch.cat([z, level_emb], dim=1)


def resolve_unclip(model: Any, conditioning: list | None, seed: int) -> list | None:
    """unCLIPConditioning's entries made ready for one sampling run, as ComfyUI's ``encode_adm`` does when
    sampling starts (the image embeddings are noised with the sampler's seed - 10):

    - a UNet with SDXL's added text-time embedding (base and refiner): revision; the noised image embedding
      replaces the entry's pooled text (ComfyUI's ``sdxl_pooled``);
    - a UNet with a projection class embedding (SD2.1 unCLIP): ``unclip_adm``, the noised embedding and its noise
      level's embedding, which the family gives the UNet as its class labels.

    Other models are told clearly that they take no image embedding."""
    if not conditioning or not any(extras.get("unclip_conditioning") for _, extras in conditioning):
        return conditioning
    from tui_diffusion.pipeline.errors import NodeError

    config = getattr(model.unet, "config", None)
    revision = getattr(config, "addition_embed_type", None) == "text_time"
    projection = getattr(config, "class_embed_type", None) == "projection"
    if not (revision or projection):
        raise NodeError(f"unCLIPConditioning: a {model.family.label} model takes no image embedding (unCLIP goes "
                        "with SD2.1 unCLIP checkpoints and SDXL)")
    out = []
    for emb, extras in conditioning:
        unclip = extras.get("unclip_conditioning")
        if not unclip:
            out.append([emb, extras])
            continue
        extras = dict(extras)
        try:
            if revision:
                width = int(extras["pooled_output"].shape[-1]) if "pooled_output" in extras else int(
                    unclip[0]["clip_vision_output"].image_embeds.shape[-1])
                adm = unclip_adm(unclip, NoiseAugmentor(width), seed=seed - 10)
                extras["pooled_output"] = adm[:, :width]
            else:
                augmentor = getattr(model.unet, "unclip_noise_augmentor", None) or NoiseAugmentor(
                    int(config.projection_class_embeddings_input_dim) // 2)
                extras["unclip_adm"] = unclip_adm(unclip, augmentor, float(extras.get("unclip_noise_augment_merge",
                                                                                      0.05)), seed=seed - 10)
        except ValueError as exc:
            raise NodeError(f"unCLIPConditioning: {exc}") from None
        out.append([emb, extras])
    return out


# -- attention masks of DiT conditioning (StyleModelApply's attn_bias) ---------------------------------------------
def _grid_resize(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """[..., h*w] over an image grid -> [..., H*W], bilinear as ComfyUI's ``upscale_dit_mask`` (one cell is
    copied; -inf, which interpolation would turn into NaN, becomes a bias no softmax weight survives)."""
    lead = x.shape[:-1]
    if src == (1, 1):
        return x.expand(*lead, dst[0] * dst[1])
    x = x.clamp(min=-1e9).reshape(-1, 1, *src)
    x = torch.nn.functional.interpolate(x, size=dst, mode="bilinear")
    return x.reshape(*lead, dst[0] * dst[1])


def dit_attention_mask(extras: dict, n_txt: int, grid: tuple[int, int]) -> torch.Tensor | None:
    """An entry's ``attention_mask`` (ComfyUI's layout: its text tokens, then ``attention_mask_img_shape`` cells
    for the image) as an additive bias [T, T] over one DiT call's tokens: ``n_txt`` text tokens (the entry's
    repeated, where the batch's contexts were brought to one length) then the ``grid`` of image tokens."""
    mask = extras.get("attention_mask")
    if mask is None:
        return None
    mask = mask.cpu()
    mask = torch.log(mask.float()) if mask.dtype == torch.bool else mask.float()
    mask = mask[0] if mask.ndim == 3 else mask
    hi, wi = (int(v) for v in extras.get("attention_mask_img_shape", (1, 1)))
    t = mask.shape[-1] - hi * wi
    if t <= 0:
        from tui_diffusion.pipeline.errors import NodeError

        raise NodeError("the conditioning's attention mask is smaller than its image cells")
    if (hi, wi) != tuple(grid):
        txt_txt, txt_img = mask[:t, :t], _grid_resize(mask[:t, t:], (hi, wi), grid)
        img_txt = _grid_resize(mask[t:, :t].t(), (hi, wi), grid).t()
        img_img = _grid_resize(mask[t:, t:], (hi, wi), grid)  # keys
        img_img = _grid_resize(img_img.t(), (hi, wi), grid).t()  # queries
        mask = torch.cat([torch.cat([txt_txt, txt_img], 1), torch.cat([img_txt, img_img], 1)], 0)
    idx = torch.cat([torch.arange(n_txt) % t, t + torch.arange(grid[0] * grid[1])])
    return mask[idx][:, idx]

"""USO (ByteDance's unified style and subject model on Flux.1 dev) as ComfyUI runs it, and the two general nodes its
template uses (specs in ``graph/specs_uso.py``):

- ModelPatchLoader reads a file of ComfyUI's ``models/model_patches`` folder. Of the kinds ComfyUI knows, the USO
  style projector (``uso-flux1-projector-v1.safetensors``: ``feature_embedder.{high,mid,low}_*`` tensors) is
  loaded; the others (Qwen-Image DiffSynth and Z-Image control patches, MultiTalk) go with models this program
  does not run and are named as such.
- USOStyleReference projects three SigLIP layers of a reference image (the 20th and 11th from last and the
  penultimate, as ComfyUI's ``USOStyleReference`` stacks them) to Flux tokens once, and returns the MODEL with them
  as a post-input patch: the family puts them before the embedded text tokens of every call (``families/flux.py``).
- FluxKontextMultiReferenceLatentMethod sets how reference latents are placed (``reference_latents_method``).
- ImageScaleToMaxDimension scales an image so its longer side is ``largest_size``.

The projector (ComfyUI's ``SigLIPMultiFeatProjModel``): per layer, a linear map over the token axis (SigLIP's 729
tokens to 64 style tokens) and SiLU, a layer norm over the channels, a linear map to the transformer's width;
the three layers' tokens concatenated high, mid, low (192 tokens of 3072 for Flux.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles.header import CheckpointError
from tui_diffusion.pipeline.clip_vision import ClipVisionOutput, read_state
from tui_diffusion.pipeline.context import NodeContext
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.models import ModelHandle
from tui_diffusion.pipeline.nodes_latent import common_upscale
from tui_diffusion.pipeline.placement import in_use, place
from tui_diffusion.pipeline.registry import NodeResult, node

#: the USO projector's key prefix in its file, and a key only it has (ComfyUI's test for the kind)
USO_PREFIX = "feature_embedder."
USO_PROBE = USO_PREFIX + "mid_layer_norm.bias"
#: the projector's three branches and the SigLIP layer each reads (ComfyUI: -20, -11 and the penultimate)
BRANCHES = (("high", -2), ("mid", -11), ("low", -20))
#: model patch kinds ComfyUI's ModelPatchLoader knows that this program has no model for: a key -> what it is
OTHER_PATCHES = {
    "controlnet_blocks.0.y_rms.weight": "a Qwen-Image DiffSynth ControlNet patch (QwenImageDiffsynthControlnet)",
    "control_all_x_embedder.2-1.weight": "a Z-Image Fun ControlNet patch",
    "audio_proj.proj1.weight": "a Wan MultiTalk audio patch",
}
#: ImageScaleToMaxDimension's methods (ComfyUI lists "bilinear" twice)
MAX_DIMENSION_METHODS = ("area", "lanczos", "bilinear", "nearest-exact", "bicubic")
#: FluxKontextMultiReferenceLatentMethod's choices, as ComfyUI lists them
REFERENCE_LATENT_METHODS = ("offset", "index", "uxo/uno", "index_timestep_zero")


class StyleProjector(torch.nn.Module):
    """USO's SigLIP multi-layer projector, its parameters named as in the file (``high_embedding_linear.0``,
    ``high_layer_norm``, ``high_projection``, the same for ``mid`` and ``low``)."""

    def __init__(self, vision_tokens: int = 729, style_tokens: int = 64, vision_width: int = 1152,
                 hidden: int = 3072, norm: bool = True) -> None:
        super().__init__()
        self.vision_tokens, self.vision_width, self.hidden = vision_tokens, vision_width, hidden
        for name, _ in BRANCHES:
            self.add_module(f"{name}_embedding_linear",
                            torch.nn.Sequential(torch.nn.Linear(vision_tokens, style_tokens), torch.nn.SiLU()))
            self.add_module(f"{name}_layer_norm", torch.nn.LayerNorm(vision_width) if norm else torch.nn.Identity())
            self.add_module(f"{name}_projection", torch.nn.Linear(vision_width, hidden))

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One SigLIP layer [B, tokens, width] -> [B, style tokens, hidden]: mixed over the tokens, normed,
        projected."""
        x = getattr(self, f"{name}_embedding_linear")(x.transpose(1, 2)).transpose(1, 2)
        return getattr(self, f"{name}_projection")(getattr(self, f"{name}_layer_norm")(x))

    def forward(self, layers: dict[str, torch.Tensor]) -> torch.Tensor:
        """{"high", "mid", "low": SigLIP hidden states} -> style tokens [B, 3 * style tokens, hidden]."""
        dtype = next(self.parameters()).dtype
        return torch.cat([self.branch(name, layers[name].to(dtype)) for name, _ in BRANCHES], dim=1)


@dataclass
class ModelPatch:
    """MODEL_PATCH: a loaded model patch file (here: USO's style projector)."""

    module: StyleProjector
    device: Device
    source: str


@dataclass(frozen=True)
class UsoStyleTokens:
    """One USOStyleReference on a MODEL: the projected reference image's tokens [B, N, width] (CPU, float32)."""

    tokens: torch.Tensor
    source: str


def projector_from_state(state: dict[str, torch.Tensor], source: str) -> StyleProjector:
    """The USO projector of a ``feature_embedder.*`` state dict, sized from its tensors (SigLIP so400m's 729 tokens
    of 1152 channels to 64 tokens of 3072 in the published file)."""
    state = {k[len(USO_PREFIX):]: v for k, v in state.items() if k.startswith(USO_PREFIX)}
    try:
        mix, proj = state["high_embedding_linear.0.weight"], state["high_projection.weight"]
        module = StyleProjector(vision_tokens=int(mix.shape[1]), style_tokens=int(mix.shape[0]),
                                vision_width=int(proj.shape[1]), hidden=int(proj.shape[0]),
                                norm="high_layer_norm.weight" in state)
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a usable USO style projector: {exc}") from None
    return module.eval()


def load_model_patch(path: Path, device: Device, allow_pickle: bool = False) -> ModelPatch:
    """ModelPatchLoader: a model patch file, of the kind its tensors say."""
    state = read_state(path, allow_pickle)
    if USO_PROBE not in state:
        for probe, what in OTHER_PATCHES.items():
            if probe in state:
                raise CheckpointError(f"{path}: {what}, for a model this program does not run; of the model "
                                      "patches, USO's style projector is supported")
        raise CheckpointError(f"{path}: not a model patch ComfyUI knows (USO's style projector has "
                              f"'{USO_PROBE}')")
    module = projector_from_state(state, str(path))
    place(module, device, device.dtype)
    return ModelPatch(module, device, str(path))


@node("ModelPatchLoader")
def model_patch_loader(ctx: NodeContext, name: str) -> NodeResult:
    eng = ctx.engine
    path, key = ctx.model_file("model_patches", name)

    def load() -> ModelPatch:
        try:
            return load_model_patch(path, eng.device, eng.allow_pickle)
        except CheckpointError as exc:
            raise NodeError(str(exc)) from None

    return NodeResult((eng.models.get(key, load),))


def siglip_layers(output: ClipVisionOutput) -> dict[str, torch.Tensor]:
    """The three SigLIP hidden states USO's projector reads, by branch; a clear error for an output without them."""
    layers = output.all_hidden_states
    if layers is None:
        raise NodeError("clip_vision_output: USO reads a SigLIP image encoder's layers; this output is a CLIP "
                        "tower's: load sigclip_vision_patch14_384.safetensors with CLIPVisionLoader")
    if layers.shape[1] < 20:
        raise NodeError(f"clip_vision_output: USO reads the encoder's 20th layer from the end; this SigLIP has "
                        f"{layers.shape[1]} layers")
    return {name: layers[:, index] for name, index in BRANCHES}


@node("USOStyleReference")
def uso_style_reference(ctx: NodeContext, model: ModelHandle, model_patch: Any,
                        clip_vision_output: Any) -> NodeResult:
    """The MODEL with the reference image's style tokens before its text tokens (ComfyUI's post-input patch)."""
    if not isinstance(model_patch, ModelPatch):
        raise NodeError("model_patch: not a model patch (connect a ModelPatchLoader)")
    if not isinstance(clip_vision_output, ClipVisionOutput):
        raise NodeError("clip_vision_output: not a CLIP vision output (connect a CLIPVisionEncode)")
    if not model.family.post_input_tokens:
        raise NodeError(f"model: USO's style tokens go to a Flux.1 model; this is {model.family.label}")
    layers = siglip_layers(clip_vision_output)
    projector = model_patch.module
    tokens, width = layers["high"].shape[1:]
    if (tokens, width) != (projector.vision_tokens, projector.vision_width):
        raise NodeError(f"clip_vision_output: {tokens} image tokens {width} wide, but the projector "
                        f"({model_patch.source}) takes {projector.vision_tokens} tokens {projector.vision_width} "
                        "wide: encode with the SigLIP it was made for (sigclip_vision_patch14_384)")
    dev = model_patch.device.torch_device
    with torch.inference_mode(), in_use(projector):
        out = projector({k: v.to(dev) for k, v in layers.items()}).float().cpu()
    patch = UsoStyleTokens(out, model_patch.source)
    return NodeResult((dataclasses.replace(model, post_input_patches=(*model.post_input_patches, patch)),))


@node("FluxKontextMultiReferenceLatentMethod")
def flux_kontext_multi_reference_latent_method(ctx: NodeContext, conditioning: list,
                                               reference_latents_method: str = "offset") -> NodeResult:
    """How the conditioning's reference latents are placed ("uxo/uno" is stored as ComfyUI stores it, "uxo")."""
    if reference_latents_method not in REFERENCE_LATENT_METHODS:
        raise NodeError(f"reference_latents_method: {reference_latents_method!r} is not one of "
                        f"{', '.join(REFERENCE_LATENT_METHODS)}")
    method = "uxo" if "uxo" in reference_latents_method or "uso" in reference_latents_method \
        else reference_latents_method
    return NodeResult(([[emb, {**extras, "reference_latents_method": method}] for emb, extras in conditioning],))


def max_dimension_size(height: int, width: int, largest: int) -> tuple[int, int]:
    """(height, width) with the longer side ``largest`` and the other in proportion, rounded (ComfyUI's)."""
    if height > width:
        return largest, round(width / height * largest)
    if width > height:
        return round(height / width * largest), largest
    return largest, largest


@node("ImageScaleToMaxDimension")
def image_scale_to_max_dimension(ctx: NodeContext, image: torch.Tensor, upscale_method: str = "area",
                                 largest_size: int = 512) -> NodeResult:
    if upscale_method not in MAX_DIMENSION_METHODS:
        raise NodeError(f"upscale_method: {upscale_method!r} is not one of {', '.join(MAX_DIMENSION_METHODS)}")
    height, width = max_dimension_size(image.shape[1], image.shape[2], largest_size)
    if height < 1 or width < 1:
        raise NodeError(f"largest_size: {largest_size} scales this {image.shape[2]}x{image.shape[1]} image to "
                        f"{width}x{height} pixels")
    out = common_upscale(image.movedim(-1, 1).float(), width, height, upscale_method, "disabled")
    return NodeResult((out.movedim(1, -1),))

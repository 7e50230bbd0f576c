"""Declarative node specs: the one place that says what each node takes and gives.

Names, types, defaults and ranges follow ComfyUI's core nodes, so API-format workflows exported
from ComfyUI validate and run unchanged. The TUI builds its forms from these specs, the validator
checks workflows against them and the CLI parses ``--set`` values with them; the implementations
live on the torch side (``tui_diffusion.pipeline.nodes``) and are looked up by class_type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tui_diffusion.graph.samplers import SAMPLERS, SCHEDULERS

# Socket types carried by links.
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
LATENT = "LATENT"
IMAGE = "IMAGE"
MASK = "MASK"
UPSCALE_MODEL = "UPSCALE_MODEL"
CONTROL_NET = "CONTROL_NET"
# Custom sampling (issue 15): a sampler choice, a sigma sequence, a noise source and a guider (model + conds + cfg).
SAMPLER = "SAMPLER"
SIGMAS = "SIGMAS"
NOISE = "NOISE"
GUIDER = "GUIDER"

# Widget (literal) types.
INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"
COMBO = "COMBO"

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class InputSpec:
    """One input of a node: a socket (link only) or a widget (literal, or a link of the same type)."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    #: Model folder whose files are the choices (e.g. "checkpoints"); values are file names in it.
    choices_from: str | None = None
    multiline: bool = False
    optional: bool = False
    #: INT values must be multiples of ``step`` (latent sizes).
    multiple_of_step: bool = False
    #: ComfyUI's "control after generate" companion widget (seeds).
    control_after_generate: bool = False
    tooltip: str = ""
    #: Of ``choices``, those this program runs; ComfyUI's others are read from a file and named when validating.
    supported: tuple[str, ...] | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class OutputSpec:
    type: str
    name: str


@dataclass(frozen=True)
class NodeSpec:
    class_type: str
    display_name: str
    category: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    output_node: bool = False
    description: str = ""
    #: this program's own node, not one of ComfyUI's (every other spec mirrors ComfyUI's node of its name)
    extension: bool = False
    _by_name: dict[str, InputSpec] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({i.name: i for i in self.inputs})

    def input(self, name: str) -> InputSpec | None:
        return self._by_name.get(name)


LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")


def _seed(name: str = "seed") -> InputSpec:
    return InputSpec(
        name, INT, default=0, min=0, max=MAX_SEED, step=1, control_after_generate=True,
        tooltip="The random seed used for creating the noise.",
    )


_SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "CheckpointLoaderSimple", "Load Checkpoint", "loaders",
        inputs=(InputSpec("ckpt_name", COMBO, choices_from="checkpoints",
                          tooltip="The checkpoint (model) to load."),),
        outputs=(OutputSpec(MODEL, "MODEL"), OutputSpec(CLIP, "CLIP"), OutputSpec(VAE, "VAE")),
        description="Loads a diffusion model checkpoint: the UNet, the text encoder and the VAE.",
    ),
    NodeSpec(
        "CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
        inputs=(
            InputSpec("text", STRING, default="", multiline=True, tooltip="The text to be encoded."),
            InputSpec("clip", CLIP, tooltip="The CLIP model used for encoding the text."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Encodes a text prompt into an embedding that guides the diffusion model.",
    ),
    NodeSpec(
        "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXL", "advanced/conditioning",
        inputs=(
            InputSpec("clip", CLIP),
            InputSpec("width", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("crop_w", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("crop_h", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("target_width", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("target_height", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("text_g", STRING, default="", multiline=True),
            InputSpec("text_l", STRING, default="", multiline=True),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="SDXL prompt with a text per encoder and explicit size conditioning.",
    ),
    NodeSpec(
        "CLIPTextEncodeSDXLRefiner", "CLIPTextEncodeSDXLRefiner", "advanced/conditioning",
        inputs=(
            InputSpec("ascore", FLOAT, default=6.0, min=0.0, max=1000.0, step=0.01),
            InputSpec("width", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=1024, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("text", STRING, default="", multiline=True),
            InputSpec("clip", CLIP),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="SDXL refiner prompt with an aesthetic score (high for positive, low for negative).",
    ),
    NodeSpec(
        "CLIPSetLastLayer", "CLIP Set Last Layer", "conditioning",
        inputs=(
            InputSpec("clip", CLIP),
            InputSpec("stop_at_clip_layer", INT, default=-1, min=-24, max=-1, step=1,
                      tooltip="-1: the last layer; -2: the penultimate (\"clip skip 2\")."),
        ),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="Reads the text encoder's output from an earlier layer (\"clip skip\").",
    ),
    NodeSpec(
        "EmptyLatentImage", "Empty Latent Image", "latent",
        inputs=(
            InputSpec("width", INT, default=512, min=16, max=MAX_RESOLUTION, step=8, multiple_of_step=True,
                      tooltip="The width of the latent images in pixels."),
            InputSpec("height", INT, default=512, min=16, max=MAX_RESOLUTION, step=8, multiple_of_step=True,
                      tooltip="The height of the latent images in pixels."),
            InputSpec("batch_size", INT, default=1, min=1, max=4096, step=1,
                      tooltip="The number of latent images in the batch."),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="An empty batch of latent images to be denoised by sampling.",
    ),
    NodeSpec(
        "KSampler", "KSampler", "sampling",
        inputs=(
            InputSpec("model", MODEL),
            _seed(),
            InputSpec("steps", INT, default=20, min=1, max=10000, step=1,
                      tooltip="The number of denoising steps."),
            InputSpec("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1,
                      tooltip="Classifier-free guidance scale."),
            InputSpec("sampler_name", COMBO, default="euler", choices=tuple(SAMPLERS)),
            InputSpec("scheduler", COMBO, default="normal", choices=SCHEDULERS),
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("latent_image", LATENT),
            InputSpec("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="How much of the latent is replaced by noise (1.0: all of it)."),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Denoises a latent image with the model, guided by the positive and negative prompts.",
    ),
    NodeSpec(
        "KSamplerAdvanced", "KSampler (Advanced)", "sampling",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("add_noise", COMBO, default="enable", choices=("enable", "disable")),
            _seed("noise_seed"),
            InputSpec("steps", INT, default=20, min=1, max=10000, step=1),
            InputSpec("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1),
            InputSpec("sampler_name", COMBO, default="euler", choices=tuple(SAMPLERS)),
            InputSpec("scheduler", COMBO, default="normal", choices=SCHEDULERS),
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("latent_image", LATENT),
            InputSpec("start_at_step", INT, default=0, min=0, max=10000, step=1),
            InputSpec("end_at_step", INT, default=10000, min=0, max=10000, step=1),
            InputSpec("return_with_leftover_noise", COMBO, default="disable", choices=("disable", "enable")),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Samples part of the schedule (steps start_at_step to end_at_step): two-stage graphs.",
    ),
    NodeSpec(
        "ConditioningCombine", "Conditioning (Combine)", "conditioning",
        inputs=(InputSpec("conditioning_1", CONDITIONING), InputSpec("conditioning_2", CONDITIONING)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Both conditionings guide the sampler; their predictions are averaged.",
    ),
    NodeSpec(
        "ConditioningSetTimestepRange", "ConditioningSetTimestepRange", "conditioning",
        inputs=(
            InputSpec("conditioning", CONDITIONING),
            InputSpec("start", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            InputSpec("end", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Applies the conditioning only between these fractions of the sampling.",
    ),
    NodeSpec(
        "LoraLoader", "Load LoRA", "loaders",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("clip", CLIP),
            InputSpec("lora_name", COMBO, choices_from="loras"),
            InputSpec("strength_model", FLOAT, default=1.0, min=-100.0, max=100.0, step=0.01),
            InputSpec("strength_clip", FLOAT, default=1.0, min=-100.0, max=100.0, step=0.01),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"), OutputSpec(CLIP, "CLIP")),
        description="Applies a LoRA (kohya/A1111 or diffusers file) to the model and its text encoder.",
    ),
    NodeSpec(
        "LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("lora_name", COMBO, choices_from="loras"),
            InputSpec("strength_model", FLOAT, default=1.0, min=-100.0, max=100.0, step=0.01),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Applies a LoRA to the model only.",
    ),
    NodeSpec(
        "ModelSamplingDiscrete", "ModelSamplingDiscrete", "advanced/model",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("sampling", COMBO, default="eps", choices=("eps", "v_prediction", "lcm")),
            InputSpec("zsnr", BOOLEAN, default=False),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Overrides what the model predicts (eps or v), for files where it cannot be detected; lcm "
                    "samples an LCM model or a model with an LCM LoRA on LCM's 50-step schedule.",
    ),
    NodeSpec(
        "VAELoader", "Load VAE", "loaders",
        inputs=(InputSpec("vae_name", COMBO, choices_from="vae"),),
        outputs=(OutputSpec(VAE, "VAE"),),
        description="Loads a VAE from models/vae (original or diffusers key layout).",
    ),
    NodeSpec(
        "VAEEncode", "VAE Encode", "latent",
        inputs=(InputSpec("pixels", IMAGE), InputSpec("vae", VAE)),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Encodes images into latents (img2img).",
    ),
    NodeSpec(
        "VAEEncodeTiled", "VAE Encode (Tiled)", "_for_testing",
        inputs=(InputSpec("pixels", IMAGE), InputSpec("vae", VAE),
                InputSpec("tile_size", INT, default=512, min=64, max=4096, step=64),
                InputSpec("overlap", INT, default=64, min=0, max=4096, step=32),
                InputSpec("temporal_size", INT, default=64, min=8, max=4096, step=4,
                          tooltip="Only used for video VAEs: amount of frames to encode at a time."),
                InputSpec("temporal_overlap", INT, default=8, min=4, max=4096, step=4,
                          tooltip="Only used for video VAEs: amount of frames to overlap.")),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Encodes images in overlapping tiles: large images in less memory.",
    ),
    NodeSpec(
        "VAEEncodeForInpaint", "VAE Encode (for Inpainting)", "latent/inpaint",
        inputs=(
            InputSpec("pixels", IMAGE), InputSpec("vae", VAE), InputSpec("mask", MASK),
            InputSpec("grow_mask_by", INT, default=6, min=0, max=64, step=1),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Encodes images with the masked area blanked, and marks that area for denoising.",
    ),
    NodeSpec(
        "SetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint",
        inputs=(InputSpec("samples", LATENT), InputSpec("mask", MASK)),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Only the masked area of the latent is denoised.",
    ),
    NodeSpec(
        "LoadImage", "Load Image", "image",
        inputs=(InputSpec("image", COMBO, choices_from="input", tooltip="An image in the input folder."),),
        outputs=(OutputSpec(IMAGE, "IMAGE"), OutputSpec(MASK, "MASK")),
        description="Loads an image from the input folder; its alpha channel becomes the mask.",
    ),
    NodeSpec(
        "LoadImageMask", "Load Image (as Mask)", "mask",
        inputs=(
            InputSpec("image", COMBO, choices_from="input"),
            InputSpec("channel", COMBO, default="alpha", choices=("alpha", "red", "green", "blue")),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="Loads one channel of an image from the input folder as a mask.",
    ),
    NodeSpec(
        "LatentUpscale", "Upscale Latent", "latent",
        inputs=(
            InputSpec("samples", LATENT),
            InputSpec("upscale_method", COMBO, default="nearest-exact", choices=LATENT_UPSCALE_METHODS),
            InputSpec("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=8, multiple_of_step=True),
            InputSpec("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=8, multiple_of_step=True),
            InputSpec("crop", COMBO, default="disabled", choices=CROP_METHODS),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Resizes latents to a pixel size (0 keeps the aspect ratio from the other side).",
    ),
    NodeSpec(
        "LatentUpscaleBy", "Upscale Latent By", "latent",
        inputs=(
            InputSpec("samples", LATENT),
            InputSpec("upscale_method", COMBO, default="nearest-exact", choices=LATENT_UPSCALE_METHODS),
            InputSpec("scale_by", FLOAT, default=1.5, min=0.01, max=8.0, step=0.01),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Resizes latents by a factor (the first half of a hires fix).",
    ),
    NodeSpec(
        "ImageScale", "Upscale Image", "image/upscaling",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("upscale_method", COMBO, default="nearest-exact", choices=IMAGE_UPSCALE_METHODS),
            InputSpec("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("crop", COMBO, default="disabled", choices=CROP_METHODS),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Resizes images to a size (0 keeps the aspect ratio from the other side).",
    ),
    NodeSpec(
        "ImageScaleBy", "Upscale Image By", "image/upscaling",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("upscale_method", COMBO, default="nearest-exact", choices=IMAGE_UPSCALE_METHODS),
            InputSpec("scale_by", FLOAT, default=1.0, min=0.01, max=8.0, step=0.01),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Resizes images by a factor.",
    ),
    NodeSpec(
        "RepeatLatentBatch", "Repeat Latent Batch", "latent/batch",
        inputs=(InputSpec("samples", LATENT), InputSpec("amount", INT, default=1, min=1, max=64, step=1)),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Repeats the latent batch; each copy gets its own noise.",
    ),
    NodeSpec(
        "LatentFromBatch", "Latent From Batch", "latent/batch",
        inputs=(
            InputSpec("samples", LATENT),
            InputSpec("batch_index", INT, default=0, min=0, max=63, step=1),
            InputSpec("length", INT, default=1, min=1, max=64, step=1),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Picks latents out of a batch; they keep the noise they had in the batch.",
    ),
    NodeSpec(
        "VAEDecode", "VAE Decode", "latent",
        inputs=(InputSpec("samples", LATENT), InputSpec("vae", VAE)),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Decodes latent images back into pixel space.",
    ),
    NodeSpec(
        "VAEDecodeTiled", "VAE Decode (Tiled)", "_for_testing",
        inputs=(InputSpec("samples", LATENT), InputSpec("vae", VAE),
                InputSpec("tile_size", INT, default=512, min=64, max=4096, step=32),
                InputSpec("overlap", INT, default=64, min=0, max=4096, step=32),
                InputSpec("temporal_size", INT, default=64, min=8, max=4096, step=4,
                          tooltip="Only used for video VAEs: amount of frames to decode at a time."),
                InputSpec("temporal_overlap", INT, default=8, min=4, max=4096, step=4,
                          tooltip="Only used for video VAEs: amount of frames to overlap.")),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Decodes latents in overlapping tiles: large images in less memory.",
    ),
    NodeSpec(
        "SaveImage", "Save Image", "image",
        inputs=(
            InputSpec("images", IMAGE),
            InputSpec("filename_prefix", STRING, default="ComfyUI",
                      tooltip="Prefix of the file names; may hold a sub-folder of the output folder."),
        ),
        output_node=True,
        description="Saves the images as PNG files, with the workflow embedded, into the output folder.",
    ),
    NodeSpec(
        "PreviewImage", "Preview Image", "image",
        inputs=(InputSpec("images", IMAGE),),
        output_node=True,
        description="Writes the images to a temporary folder for viewing.",
    ),
    # -- SD3/SD3.5 and Flux.1 (issue 15): separate-file loaders and the families' own nodes --------------------
    NodeSpec(
        "UNETLoader", "Load Diffusion Model", "advanced/loaders",
        inputs=(
            InputSpec("unet_name", COMBO, choices_from="diffusion_models",
                      tooltip="A diffusion model alone (SD3.5, Flux.1) from diffusion_models/ (or unet/)."),
            InputSpec("weight_dtype", COMBO, default="default",
                      choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
                      tooltip="fp8 rounds the weights to fp8 as stored; they are computed in the device's dtype."),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Loads a diffusion model file without text encoders or VAE (SD3.5 and Flux.1 transformers).",
    ),
    NodeSpec(
        "CLIPLoader", "Load CLIP", "advanced/loaders",
        inputs=(
            InputSpec("clip_name", COMBO, choices_from="text_encoders"),
            InputSpec("type", COMBO, default="stable_diffusion",
                      choices=("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
                               "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
                               "hunyuan_image", "flux2", "ovis"),
                      tooltip="stable_diffusion (CLIP-L) and sd3 (any one of CLIP-L, CLIP-G, T5-XXL) load here.",
                      supported=("stable_diffusion", "sd3")),
            InputSpec("device", COMBO, default="default", choices=("default", "cpu"), optional=True),
        ),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="Loads one text encoder from text_encoders/ (or clip/).",
    ),
    NodeSpec(
        "DualCLIPLoader", "DualCLIPLoader", "advanced/loaders",
        inputs=(
            InputSpec("clip_name1", COMBO, choices_from="text_encoders"),
            InputSpec("clip_name2", COMBO, choices_from="text_encoders"),
            InputSpec("type", COMBO, default="sdxl",
                      choices=("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15",
                               "kandinsky5", "kandinsky5_image", "ltxv", "newbie", "ace"),
                      tooltip="sdxl: CLIP-L + CLIP-G; sd3: two of CLIP-L, CLIP-G, T5; flux: CLIP-L + T5.",
                      supported=("sdxl", "sd3", "flux")),
            InputSpec("device", COMBO, default="default", choices=("default", "cpu"), optional=True),
        ),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="Loads two text encoders as one CLIP (SDXL, SD3, Flux).",
    ),
    NodeSpec(
        "TripleCLIPLoader", "TripleCLIPLoader", "advanced/loaders",
        inputs=(
            InputSpec("clip_name1", COMBO, choices_from="text_encoders"),
            InputSpec("clip_name2", COMBO, choices_from="text_encoders"),
            InputSpec("clip_name3", COMBO, choices_from="text_encoders"),
        ),
        outputs=(OutputSpec(CLIP, "CLIP"),),
        description="Loads CLIP-L, CLIP-G and T5-XXL as SD3's CLIP.",
    ),
    NodeSpec(
        "EmptySD3LatentImage", "EmptySD3LatentImage", "latent/sd3",
        inputs=(
            InputSpec("width", INT, default=1024, min=16, max=MAX_RESOLUTION, step=16),
            InputSpec("height", INT, default=1024, min=16, max=MAX_RESOLUTION, step=16),
            InputSpec("batch_size", INT, default=1, min=1, max=4096, step=1),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="An empty 16-channel latent (SD3, Flux).",
    ),
    NodeSpec(
        "ModelSamplingSD3", "ModelSamplingSD3", "advanced/model",
        inputs=(InputSpec("model", MODEL), InputSpec("shift", FLOAT, default=3.0, min=0.0, max=100.0, step=0.01)),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Rectified-flow sampling with this shift (larger: more steps at high noise).",
    ),
    NodeSpec(
        "CLIPTextEncodeSD3", "CLIPTextEncodeSD3", "advanced/conditioning",
        inputs=(
            InputSpec("clip", CLIP),
            InputSpec("clip_l", STRING, default="", multiline=True),
            InputSpec("clip_g", STRING, default="", multiline=True),
            InputSpec("t5xxl", STRING, default="", multiline=True),
            InputSpec("empty_padding", COMBO, default="none", choices=("none", "empty_prompt"),
                      tooltip="none: an empty text leaves its encoder out."),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="SD3 prompt with a text per encoder.",
    ),
    NodeSpec(
        "ConditioningZeroOut", "ConditioningZeroOut", "advanced/conditioning",
        inputs=(InputSpec("conditioning", CONDITIONING),),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The conditioning with its embeddings and pooled output set to zero (SD3's negative).",
    ),
    NodeSpec(
        "FluxGuidance", "FluxGuidance", "advanced/conditioning/flux",
        inputs=(InputSpec("conditioning", CONDITIONING),
                InputSpec("guidance", FLOAT, default=3.5, min=0.0, max=100.0, step=0.1)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The guidance value Flux dev embeds (distilled guidance; use CFG 1).",
    ),
    NodeSpec(
        "ModelSamplingFlux", "ModelSamplingFlux", "advanced/model",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("max_shift", FLOAT, default=1.15, min=0.0, max=100.0, step=0.01),
            InputSpec("base_shift", FLOAT, default=0.5, min=0.0, max=100.0, step=0.01),
            InputSpec("width", INT, default=1024, min=16, max=MAX_RESOLUTION, step=8),
            InputSpec("height", INT, default=1024, min=16, max=MAX_RESOLUTION, step=8),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Flux sampling with the shift for this image size (base_shift at 256x256, max_shift at 1024x1024).",
    ),
    NodeSpec(
        "CLIPTextEncodeFlux", "CLIPTextEncodeFlux", "advanced/conditioning/flux",
        inputs=(
            InputSpec("clip", CLIP),
            InputSpec("clip_l", STRING, default="", multiline=True),
            InputSpec("t5xxl", STRING, default="", multiline=True),
            InputSpec("guidance", FLOAT, default=3.5, min=0.0, max=100.0, step=0.1),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Flux prompt: CLIP-L's text gives the pooled vector, T5's the tokens; with Flux dev's guidance.",
    ),
    # -- custom sampling (ComfyUI's nodes_custom_sampler and nodes_model_advanced; issue 15 item 7) ---------------
    NodeSpec(
        "KSamplerSelect", "KSamplerSelect", "sampling/custom_sampling/samplers",
        inputs=(InputSpec("sampler_name", COMBO, default="euler", choices=tuple(SAMPLERS)),),
        outputs=(OutputSpec(SAMPLER, "SAMPLER"),),
        description="Picks one of the samplers for SamplerCustom / SamplerCustomAdvanced.",
    ),
    NodeSpec(
        "BasicScheduler", "BasicScheduler", "sampling/custom_sampling/schedulers",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("scheduler", COMBO, default="normal", choices=SCHEDULERS),
            InputSpec("steps", INT, default=20, min=1, max=10000, step=1),
            InputSpec("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
        ),
        outputs=(OutputSpec(SIGMAS, "SIGMAS"),),
        description="The sigmas of a scheduler for this model (the tail of a longer schedule when denoise < 1).",
    ),
    NodeSpec(
        "SDTurboScheduler", "SDTurboScheduler", "sampling/custom_sampling/schedulers",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("steps", INT, default=1, min=1, max=10, step=1),
            InputSpec("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
        ),
        outputs=(OutputSpec(SIGMAS, "SIGMAS"),),
        description="SD Turbo's schedule: timesteps 999, 899, ... (one to ten steps).",
    ),
    NodeSpec(
        "OptimalStepsScheduler", "OptimalStepsScheduler", "sampling/custom_sampling/schedulers",
        inputs=(
            InputSpec("model_type", COMBO, default="FLUX", choices=("FLUX", "Wan", "Chroma")),
            InputSpec("steps", INT, default=20, min=3, max=1000, step=1),
            InputSpec("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
        ),
        outputs=(OutputSpec(SIGMAS, "SIGMAS"),),
        description="The OptimalSteps paper's searched noise levels for this model type, log-linearly stretched "
                    "to the step count (the tail of them when denoise < 1); needs no model.",
    ),
    NodeSpec(
        "SplitSigmas", "SplitSigmas", "sampling/custom_sampling/sigmas",
        inputs=(InputSpec("sigmas", SIGMAS), InputSpec("step", INT, default=0, min=0, max=10000, step=1)),
        outputs=(OutputSpec(SIGMAS, "high_sigmas"), OutputSpec(SIGMAS, "low_sigmas")),
        description="Splits the sigmas at a step: the first part up to it, the second from it.",
    ),
    NodeSpec(
        "FlipSigmas", "FlipSigmas", "sampling/custom_sampling/sigmas",
        inputs=(InputSpec("sigmas", SIGMAS),),
        outputs=(OutputSpec(SIGMAS, "SIGMAS"),),
        description="Reverses the sigmas (a leading 0 becomes 0.0001): sampling towards noise.",
    ),
    NodeSpec(
        "RandomNoise", "RandomNoise", "sampling/custom_sampling/noise",
        inputs=(_seed("noise_seed"),),
        outputs=(OutputSpec(NOISE, "NOISE"),),
        description="Initial noise from this seed (as KSampler draws it).",
    ),
    NodeSpec(
        "DisableNoise", "DisableNoise", "sampling/custom_sampling/noise",
        inputs=(),
        outputs=(OutputSpec(NOISE, "NOISE"),),
        description="No initial noise: the latent is sampled as it is (for a second stage).",
    ),
    NodeSpec(
        "BasicGuider", "BasicGuider", "sampling/custom_sampling/guiders",
        inputs=(InputSpec("model", MODEL), InputSpec("conditioning", CONDITIONING)),
        outputs=(OutputSpec(GUIDER, "GUIDER"),),
        description="The model guided by one conditioning, without CFG (Flux, distilled models).",
    ),
    NodeSpec(
        "CFGGuider", "CFGGuider", "sampling/custom_sampling/guiders",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1),
        ),
        outputs=(OutputSpec(GUIDER, "GUIDER"),),
        description="The model with classifier-free guidance between a positive and a negative conditioning.",
    ),
    NodeSpec(
        "SamplerCustom", "SamplerCustom", "sampling/custom_sampling",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("add_noise", BOOLEAN, default=True),
            _seed("noise_seed"),
            InputSpec("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1),
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("sampler", SAMPLER),
            InputSpec("sigmas", SIGMAS),
            InputSpec("latent_image", LATENT),
        ),
        outputs=(OutputSpec(LATENT, "output"), OutputSpec(LATENT, "denoised_output")),
        description="Samples along given sigmas with a chosen sampler; also gives the last denoised prediction.",
    ),
    NodeSpec(
        "SamplerCustomAdvanced", "SamplerCustomAdvanced", "sampling/custom_sampling",
        inputs=(
            InputSpec("noise", NOISE),
            InputSpec("guider", GUIDER),
            InputSpec("sampler", SAMPLER),
            InputSpec("sigmas", SIGMAS),
            InputSpec("latent_image", LATENT),
        ),
        outputs=(OutputSpec(LATENT, "output"), OutputSpec(LATENT, "denoised_output")),
        description="Samples with a noise source, a guider, a sampler and sigmas (ComfyUI's Flux workflows).",
    ),
    NodeSpec(
        "ModelSamplingAuraFlow", "ModelSamplingAuraFlow", "advanced/model",
        inputs=(InputSpec("model", MODEL), InputSpec("shift", FLOAT, default=1.73, min=0.0, max=100.0, step=0.01)),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Rectified-flow sampling with this shift, the network given sigma itself (flow models only).",
    ),
    NodeSpec(
        "ModelSamplingContinuousEDM", "ModelSamplingContinuousEDM", "advanced/model",
        inputs=(
            InputSpec("model", MODEL),
            InputSpec("sampling", COMBO, default="v_prediction", choices=("v_prediction", "edm", "eps")),
            InputSpec("sigma_max", FLOAT, default=120.0, min=0.0, max=1000.0, step=0.001),
            InputSpec("sigma_min", FLOAT, default=0.002, min=0.0, max=1000.0, step=0.001),
        ),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Continuous-time (EDM) sampling between these sigmas (UNet models trained that way).",
    ),
    # -- images, masks, latents and upscale models (issue 16, items 2-4) -----------------------------------------
    NodeSpec(
        "UpscaleModelLoader", "Load Upscale Model", "loaders",
        inputs=(InputSpec("model_name", COMBO, choices_from="upscale_models",
                          tooltip="An ESRGAN, Real-ESRGAN, SwinIR, ... file from upscale_models/ (spandrel)."),),
        outputs=(OutputSpec(UPSCALE_MODEL, "UPSCALE_MODEL"),),
        description="Loads a single-image upscale model; .pth files only with --allow-pickle (weights only).",
    ),
    NodeSpec(
        "ImageUpscaleWithModel", "Upscale Image (using Model)", "image/upscaling",
        inputs=(InputSpec("upscale_model", UPSCALE_MODEL), InputSpec("image", IMAGE)),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Upscales by the model's own factor, in 512-pixel tiles overlapping by 32 (smaller on OOM).",
    ),
    NodeSpec(
        "ImageScaleToTotalPixels", "ImageScaleToTotalPixels", "image/upscaling",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("upscale_method", COMBO, default="nearest-exact", choices=IMAGE_UPSCALE_METHODS),
            InputSpec("megapixels", FLOAT, default=1.0, min=0.01, max=16.0, step=0.01),
            InputSpec("resolution_steps", INT, default=1, min=1, max=256, step=1,
                      tooltip="Width and height are rounded to multiples of this."),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Resizes images to about this many megapixels (of 1024x1024), keeping the aspect ratio.",
    ),
    NodeSpec(
        "ImagePadForOutpaint", "Pad Image for Outpainting", "image",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("left", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("top", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("right", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("bottom", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("feathering", INT, default=40, min=0, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"), OutputSpec(MASK, "MASK")),
        description="Adds grey borders to outpaint into, and a mask of them (feathered into the image).",
    ),
    NodeSpec(
        "ImageCrop", "Image Crop", "image/transform",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Cuts a rectangle out of the images (clipped to them).",
    ),
    NodeSpec(
        "ImageBlur", "Image Blur", "image/postprocessing",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("blur_radius", INT, default=1, min=1, max=31, step=1),
            InputSpec("sigma", FLOAT, default=1.0, min=0.1, max=10.0, step=0.1),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Gaussian blur (sigma in units of the radius, as ComfyUI's).",
    ),
    NodeSpec(
        "ImageSharpen", "Image Sharpen", "image/postprocessing",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("sharpen_radius", INT, default=1, min=1, max=31, step=1),
            InputSpec("sigma", FLOAT, default=1.0, min=0.1, max=10.0, step=0.01),
            InputSpec("alpha", FLOAT, default=1.0, min=0.0, max=5.0, step=0.01),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Sharpens by subtracting a Gaussian-blurred copy (unsharp mask).",
    ),
    NodeSpec(
        "ImageBatch", "Batch Images", "image",
        inputs=(InputSpec("image1", IMAGE), InputSpec("image2", IMAGE)),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="One batch of both; image2 is resized (centre crop) to image1's size when they differ.",
    ),
    NodeSpec(
        "ImageStitch", "Image Stitch", "image/transform",
        inputs=(
            InputSpec("image1", IMAGE),
            InputSpec("direction", COMBO, default="right", choices=("right", "down", "left", "up")),
            InputSpec("match_image_size", BOOLEAN, default=True),
            InputSpec("spacing_width", INT, default=0, min=0, max=1024, step=2),
            InputSpec("spacing_color", COMBO, default="white", choices=("white", "black", "red", "green", "blue")),
            InputSpec("image2", IMAGE, optional=True),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Puts image2 beside image1 (to the right, below, ...), optionally with a gap.",
    ),
    NodeSpec(
        "ImageCompositeMasked", "ImageCompositeMasked", "image",
        inputs=(
            InputSpec("destination", IMAGE),
            InputSpec("source", IMAGE),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("resize_source", BOOLEAN, default=False),
            InputSpec("mask", MASK, optional=True),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Pastes source onto destination at x, y (through the mask when one is given).",
    ),
    NodeSpec(
        "EmptyImage", "EmptyImage", "image",
        inputs=(
            InputSpec("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("batch_size", INT, default=1, min=1, max=4096, step=1),
            InputSpec("color", INT, default=0, min=0, max=0xFFFFFF, step=1, tooltip="0xRRGGBB"),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="A batch of images of one colour.",
    ),
    NodeSpec(
        "ImageInvert", "Invert Image", "image",
        inputs=(InputSpec("image", IMAGE),),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="1 - each value (a negative).",
    ),
    NodeSpec(
        "Canny", "Canny", "image/preprocessors",
        inputs=(
            InputSpec("image", IMAGE),
            InputSpec("low_threshold", FLOAT, default=0.4, min=0.01, max=0.99, step=0.01),
            InputSpec("high_threshold", FLOAT, default=0.8, min=0.01, max=0.99, step=0.01),
            InputSpec("device", COMBO, default="cpu", choices=("cpu", "gpu"), optional=True),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Edges (white on black) by the Canny detector: for ControlNets and line art.",
    ),
    NodeSpec(
        "SolidMask", "SolidMask", "mask",
        inputs=(
            InputSpec("value", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
            InputSpec("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="A mask of one value.",
    ),
    NodeSpec(
        "InvertMask", "InvertMask", "mask",
        inputs=(InputSpec("mask", MASK),),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="1 - the mask.",
    ),
    NodeSpec(
        "MaskComposite", "MaskComposite", "mask",
        inputs=(
            InputSpec("destination", MASK),
            InputSpec("source", MASK),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("operation", COMBO, default="multiply",
                      choices=("multiply", "add", "subtract", "and", "or", "xor")),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="Combines source into destination at x, y; the result is clamped to 0..1.",
    ),
    NodeSpec(
        "FeatherMask", "FeatherMask", "mask",
        inputs=(
            InputSpec("mask", MASK),
            InputSpec("left", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("top", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("right", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("bottom", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="Fades the mask linearly to its edges over these many pixels.",
    ),
    NodeSpec(
        "GrowMask", "Grow Mask", "mask",
        inputs=(
            InputSpec("mask", MASK),
            InputSpec("expand", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                      tooltip="Pixels to grow by (negative: shrink)."),
            InputSpec("tapered_corners", BOOLEAN, default=True),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="Grows (dilates) or shrinks (erodes) the mask one pixel per step.",
    ),
    NodeSpec(
        "ThresholdMask", "ThresholdMask", "mask",
        inputs=(InputSpec("mask", MASK), InputSpec("value", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01)),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="1 where the mask is above the value, else 0.",
    ),
    NodeSpec(
        "CropMask", "CropMask", "mask",
        inputs=(
            InputSpec("mask", MASK),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            InputSpec("width", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            InputSpec("height", INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
        ),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="Cuts a rectangle out of the mask.",
    ),
    NodeSpec(
        "ImageToMask", "Convert Image to Mask", "mask",
        inputs=(InputSpec("image", IMAGE),
                InputSpec("channel", COMBO, default="red", choices=("red", "green", "blue", "alpha"))),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="One channel of the images as a mask.",
    ),
    NodeSpec(
        "MaskToImage", "Convert Mask to Image", "mask",
        inputs=(InputSpec("mask", MASK),),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="The mask as grey images.",
    ),
    NodeSpec(
        "ImageColorToMask", "ImageColorToMask", "mask",
        inputs=(InputSpec("image", IMAGE), InputSpec("color", INT, default=0, min=0, max=0xFFFFFF, step=1,
                                                      tooltip="0xRRGGBB")),
        outputs=(OutputSpec(MASK, "MASK"),),
        description="1 where the pixel is exactly this colour (in 8-bit levels), else 0.",
    ),
    NodeSpec(
        "MaskPreview", "Preview Mask", "mask",
        inputs=(InputSpec("mask", MASK),),
        output_node=True,
        description="Writes the mask as grey images to a temporary folder for viewing.",
    ),
    NodeSpec(
        "LatentComposite", "Latent Composite", "latent",
        inputs=(
            InputSpec("samples_to", LATENT),
            InputSpec("samples_from", LATENT),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("feather", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Pastes samples_from into samples_to at x, y (pixels), with feathered edges.",
    ),
    NodeSpec(
        "LatentCompositeMasked", "LatentCompositeMasked", "latent",
        inputs=(
            InputSpec("destination", LATENT),
            InputSpec("source", LATENT),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("resize_source", BOOLEAN, default=False),
            InputSpec("mask", MASK, optional=True),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Pastes source into destination at x, y (pixels), through the mask when one is given.",
    ),
    NodeSpec(
        "LatentBlend", "Latent Blend", "_for_testing",
        inputs=(
            InputSpec("samples1", LATENT),
            InputSpec("samples2", LATENT),
            InputSpec("blend_factor", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="samples1 x blend_factor + samples2 x (1 - blend_factor).",
    ),
    NodeSpec(
        "LatentCrop", "Crop Latent", "latent/transform",
        inputs=(
            InputSpec("samples", LATENT),
            InputSpec("width", INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
            InputSpec("height", INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
            InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
        ),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Cuts a rectangle (in pixels) out of the latents.",
    ),
    NodeSpec(
        "LatentFlip", "Flip Latent", "latent/transform",
        inputs=(InputSpec("samples", LATENT),
                InputSpec("flip_method", COMBO, default="x-axis: vertically",
                          choices=("x-axis: vertically", "y-axis: horizontally"))),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Mirrors the latents upside down (x-axis) or left to right (y-axis).",
    ),
    NodeSpec(
        "LatentRotate", "Rotate Latent", "latent/transform",
        inputs=(InputSpec("samples", LATENT),
                InputSpec("rotation", COMBO, default="none",
                          choices=("none", "90 degrees", "180 degrees", "270 degrees"))),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Turns the latents clockwise.",
    ),
    NodeSpec(
        "SaveLatent", "SaveLatent", "_for_testing",
        inputs=(
            InputSpec("samples", LATENT),
            InputSpec("filename_prefix", STRING, default="latents/ComfyUI",
                      tooltip="Prefix of the file names; may hold a sub-folder of the output folder."),
        ),
        output_node=True,
        description="Saves the latents as a ComfyUI .latent file (safetensors) into the output folder.",
    ),
    NodeSpec(
        "LoadLatent", "LoadLatent", "_for_testing",
        inputs=(InputSpec("latent", COMBO, choices_from="input_latents",
                          tooltip="A .latent file in the input folder."),),
        outputs=(OutputSpec(LATENT, "LATENT"),),
        description="Loads a ComfyUI .latent file from the input folder.",
    ),
    # -- ControlNets and T2I-Adapters (issue 16 item 1; ComfyUI's nodes.py and nodes_controlnet/nodes_sd3) ---------
    NodeSpec(
        "ControlNetLoader", "Load ControlNet Model", "loaders",
        inputs=(InputSpec("control_net_name", COMBO, choices_from="controlnet",
                          tooltip="A ControlNet or T2I-Adapter from controlnet/ (or t2i_adapter/)."),),
        outputs=(OutputSpec(CONTROL_NET, "CONTROL_NET"),),
        description="Loads a ControlNet (SD1.x, SD2.x, SDXL) or a T2I-Adapter.",
    ),
    NodeSpec(
        "DiffControlNetLoader", "Load ControlNet Model (diff)", "loaders",
        inputs=(InputSpec("model", MODEL), InputSpec("control_net_name", COMBO, choices_from="controlnet")),
        outputs=(OutputSpec(CONTROL_NET, "CONTROL_NET"),),
        description="Loads a ControlNet stored as a difference to a model: the model's weights are added to it.",
    ),
    NodeSpec(
        "ControlNetApply", "Apply ControlNet (OLD)", "conditioning/controlnet",
        inputs=(
            InputSpec("conditioning", CONDITIONING),
            InputSpec("control_net", CONTROL_NET),
            InputSpec("image", IMAGE),
            InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Deprecated in ComfyUI: a ControlNet on one conditioning for every step (the negative too).",
    ),
    NodeSpec(
        "ControlNetApplyAdvanced", "Apply ControlNet", "conditioning/controlnet",
        inputs=(
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("control_net", CONTROL_NET),
            InputSpec("image", IMAGE),
            InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
            InputSpec("start_percent", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            InputSpec("end_percent", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001),
            InputSpec("vae", VAE, optional=True,
                      tooltip="Encodes the hint of ControlNets that take a latent (SD3/SD3.5 and InstantX Flux ones)."),
        ),
        outputs=(OutputSpec(CONDITIONING, "positive"), OutputSpec(CONDITIONING, "negative")),
        description="Guides sampling by a hint image (edges, depth, pose) between start and end of the schedule; "
                    "chains with the ControlNets already applied.",
    ),
    NodeSpec(
        "ControlNetApplySD3", "Apply Controlnet with VAE", "conditioning/controlnet",
        inputs=(
            InputSpec("positive", CONDITIONING),
            InputSpec("negative", CONDITIONING),
            InputSpec("control_net", CONTROL_NET),
            InputSpec("vae", VAE),
            InputSpec("image", IMAGE),
            InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
            InputSpec("start_percent", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            InputSpec("end_percent", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001),
        ),
        outputs=(OutputSpec(CONDITIONING, "positive"), OutputSpec(CONDITIONING, "negative")),
        description="Deprecated in ComfyUI: Apply ControlNet with a VAE input.",
    ),
    NodeSpec(
        "SetUnionControlNetType", "SetUnionControlNetType", "conditioning/controlnet",
        inputs=(
            InputSpec("control_net", CONTROL_NET),
            InputSpec("type", COMBO, default="auto",
                      choices=("auto", "openpose", "depth", "hed/pidi/scribble/ted",
                               "canny/lineart/anime_lineart/mlsd", "normal", "segment", "tile", "repaint"),
                      tooltip="The task of a union ControlNet (ControlNet++); 'auto' leaves the ControlNet as it is."),
        ),
        outputs=(OutputSpec(CONTROL_NET, "CONTROL_NET"),),
        description="Selects the task of a union ControlNet.",
    ),
    # -- Flux.1 Fill, Canny/Depth and Kontext (ComfyUI's nodes.py, nodes_ip2p, nodes_flux, nodes_edit_model,
    #    nodes_differential_diffusion) ------------------------------------------------------------------------
    NodeSpec(
        "InpaintModelConditioning", "InpaintModelConditioning", "conditioning/inpaint",
        inputs=(
            InputSpec("positive", CONDITIONING), InputSpec("negative", CONDITIONING), InputSpec("vae", VAE),
            InputSpec("pixels", IMAGE), InputSpec("mask", MASK),
            InputSpec("noise_mask", BOOLEAN, default=True,
                      tooltip="Add the mask to the latent as its noise mask, so that only the masked area is "
                              "sampled."),
        ),
        outputs=(OutputSpec(CONDITIONING, "positive"), OutputSpec(CONDITIONING, "negative"),
                 OutputSpec(LATENT, "latent")),
        description="Conditioning for inpainting models (Flux Fill): the masked image's latent and the mask.",
    ),
    NodeSpec(
        "InstructPixToPixConditioning", "InstructPixToPixConditioning", "conditioning/instructpix2pix",
        inputs=(InputSpec("positive", CONDITIONING), InputSpec("negative", CONDITIONING), InputSpec("vae", VAE),
                InputSpec("pixels", IMAGE)),
        outputs=(OutputSpec(CONDITIONING, "positive"), OutputSpec(CONDITIONING, "negative"),
                 OutputSpec(LATENT, "latent")),
        description="Conditioning with an image's latent for the models that read it (Flux Canny/Depth).",
    ),
    NodeSpec(
        "DifferentialDiffusion", "Differential Diffusion", "_for_testing",
        inputs=(InputSpec("model", MODEL),
                InputSpec("strength", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01, optional=True)),
        outputs=(OutputSpec(MODEL, "MODEL"),),
        description="Soft inpainting masks: each area is denoised for a share of the steps set by its mask value.",
    ),
    NodeSpec(
        "ReferenceLatent", "ReferenceLatent", "advanced/conditioning/edit_models",
        inputs=(InputSpec("conditioning", CONDITIONING), InputSpec("latent", LATENT, optional=True)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Adds a reference latent that an edit model (Flux Kontext) works from; chain for several.",
    ),
    NodeSpec(
        "FluxKontextImageScale", "FluxKontextImageScale", "advanced/conditioning/flux",
        inputs=(InputSpec("image", IMAGE),),
        outputs=(OutputSpec(IMAGE, "IMAGE"),),
        description="Resizes the image to the Flux Kontext size nearest its aspect ratio.",
    ),
    NodeSpec(
        "ConditioningAverage", "ConditioningAverage", "conditioning",  # ComfyUI shows the class name
        inputs=(InputSpec("conditioning_to", CONDITIONING), InputSpec("conditioning_from", CONDITIONING),
                InputSpec("conditioning_to_strength", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Blends two prompts' embeddings: strength 1 is conditioning_to, 0 is conditioning_from.",
    ),
    NodeSpec(
        "ConditioningConcat", "Conditioning (Concat)", "conditioning",
        inputs=(InputSpec("conditioning_to", CONDITIONING), InputSpec("conditioning_from", CONDITIONING)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="Appends conditioning_from's tokens to conditioning_to's, as one longer prompt.",
    ),
    NodeSpec(
        "ConditioningSetArea", "Conditioning (Set Area)", "conditioning",
        inputs=(InputSpec("conditioning", CONDITIONING),
                InputSpec("width", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
                InputSpec("height", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
                InputSpec("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
                InputSpec("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
                InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The conditioning guides only this rectangle of the image (pixels), with this weight.",
    ),
    NodeSpec(
        "ConditioningSetAreaPercentage", "Conditioning (Set Area with Percentage)", "conditioning",
        inputs=(InputSpec("conditioning", CONDITIONING),
                InputSpec("width", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
                InputSpec("height", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
                InputSpec("x", FLOAT, default=0.0, min=0.0, max=1.0, step=0.01),
                InputSpec("y", FLOAT, default=0.0, min=0.0, max=1.0, step=0.01),
                InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The conditioning guides only this rectangle, in fractions of the image size.",
    ),
    NodeSpec(
        "ConditioningSetAreaStrength", "ConditioningSetAreaStrength", "conditioning",
        inputs=(InputSpec("conditioning", CONDITIONING),
                InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01)),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The conditioning's weight where it overlaps others.",
    ),
    NodeSpec(
        "ConditioningSetMask", "Conditioning (Set Mask)", "conditioning",
        inputs=(InputSpec("conditioning", CONDITIONING), InputSpec("mask", MASK),
                InputSpec("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
                InputSpec("set_cond_area", COMBO, default="default", choices=("default", "mask bounds"))),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING"),),
        description="The conditioning guides the image where the mask is set, weighted by the mask.",
    ),
)

# Areas with their own spec modules; imported here, after the types they use are defined.
from tui_diffusion.graph import (  # noqa: E402
    specs_cache,
    specs_gligen,
    specs_lotus,
    specs_merge,
    specs_uso,
    specs_vision,
)

_SPECS = (_SPECS + specs_vision.SPECS + specs_gligen.SPECS + specs_merge.SPECS + specs_cache.SPECS
          + specs_lotus.SPECS + specs_uso.SPECS)
NODE_SPECS: dict[str, NodeSpec] = {s.class_type: s for s in _SPECS}


def get_spec(class_type: str) -> NodeSpec | None:
    return NODE_SPECS.get(class_type)


def supported_choices(class_type: str, name: str) -> tuple[str, ...]:
    """The values of a COMBO input that this program runs (its ``supported``, else all its choices)."""
    spec = get_spec(class_type)
    inp = spec.input(name) if spec is not None else None
    if inp is None:
        raise KeyError(f"{class_type}.{name}")
    return inp.supported or inp.choices or ()

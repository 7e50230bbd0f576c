"""Settings handed to the worker at spawn: folders and the device policy, as plain values.

No import-time globals: the worker builds its device and caches from this one object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tui_diffusion.paths import default_input_dir, default_models_dir, default_output_dir, default_temp_dir

MEMORY_MODES = ("normal", "highvram", "lowvram", "novram")
PRECISIONS = ("fp32", "fp16", "bf16")
#: ComfyUI's --preview-method; "auto" here takes TAESD when its decoder file is there, else latent2rgb
PREVIEW_METHODS = ("auto", "latent2rgb", "taesd", "none")
#: diffusers' step-cache hooks (pipeline/step_cache.py); "none": every step runs the whole network
STEP_CACHE_METHODS = ("none", "first_block_cache", "taylorseer")


@dataclass(frozen=True)
class DevicePolicy:
    #: "auto" (CUDA, then MPS, then CPU), "cpu", or an explicit torch device string such as "cuda:1"
    device: str = "auto"
    #: normal/highvram: models live on the GPU; lowvram: each model moves to the GPU only while it runs and
    #: the VAE decodes in tiles; novram: layer by layer
    memory: str = "normal"
    #: UNet and text encoders; None: fp16 on a GPU, fp32 on the CPU
    precision: str | None = None
    #: the VAE; None: fp32 (SD's VAE overflows in fp16)
    vae_precision: str | None = None
    #: torch.compile the UNet or transformer: a slow first job per checkpoint and size, then faster steps (opt-in)
    compile: bool = False


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one workflow from taking the machine down; checked before a job is queued and again
    on what each node produces."""

    #: widest and tallest image, in pixels
    max_side: int = 8192
    #: images per batch
    max_batch: int = 64
    #: characters in one prompt
    max_prompt_chars: int = 20000


@dataclass(frozen=True)
class WorkerConfig:
    models_dir: Path = field(default_factory=default_models_dir)
    output_dir: Path = field(default_factory=default_output_dir)
    input_dir: Path = field(default_factory=default_input_dir)
    #: (kind, folder) pairs from ComfyUI's extra_model_paths.yaml
    extra_model_paths: tuple = ()
    temp_dir: Path = field(default_factory=default_temp_dir)
    device: DevicePolicy = field(default_factory=DevicePolicy)
    #: loaded checkpoints kept in memory between jobs (least recently used is dropped first)
    max_checkpoints: int = 2
    #: send the worker's stdout and stderr to its log file (the TUI owns the terminal)
    log_to_file_only: bool = False
    #: the run-history database (None: the default in the user data folder, or $TUI_DIFFUSION_DB)
    db_path: Path | None = None
    record_history: bool = True
    #: load .ckpt/.pt/.bin files (with torch.load(weights_only=True) only); off: they are refused
    allow_pickle: bool = False
    limits: Limits = field(default_factory=Limits)
    #: CUDA_VISIBLE_DEVICES for this worker (one worker per GPU in a pool); None: leave it as it is
    visible_devices: str | None = None
    #: torch's CPU threads (a pool of N CPU workers splits the cores); None: torch's default
    torch_threads: int | None = None
    #: how sampling previews are made (PREVIEW_METHODS)
    preview_method: str = "auto"
    #: the step cache of models that no ApplyStepCache node set (STEP_CACHE_METHODS)
    step_cache: str = "none"
    #: checkpoints (names in the checkpoints folder) the worker loads as soon as it is ready, while no job
    #: waits: the app's open workflow's, so its first job does not start with the load
    preload: tuple[str, ...] = ()

"""ComfyUI's sampler and scheduler names, and which pairs this engine can run.

Torch-free data: the TUI builds its select boxes from it and the validator rejects pairs the
engine cannot honour. The torch side (``pipeline/sampling.py``) maps each name to a diffusers
scheduler.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerInfo:
    """What the engine needs to know about one ComfyUI sampler name."""

    name: str
    label: str
    #: ComfyUI computes steps+1 sigmas and drops the penultimate one for these samplers.
    drops_penultimate_sigma: bool = False
    #: The sampler runs on its own fixed timestep grid (diffusers' PNDM), not on a sigma schedule.
    own_schedule: bool = False
    #: Python module the sampler needs at run time, if any.
    requires: str | None = None


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo("euler", "Euler"),
        SamplerInfo("euler_ancestral", "Euler a"),
        SamplerInfo("heun", "Heun"),
        SamplerInfo("dpm_2", "DPM2", drops_penultimate_sigma=True),
        SamplerInfo("dpm_2_ancestral", "DPM2 a", drops_penultimate_sigma=True),
        SamplerInfo("lms", "LMS"),
        SamplerInfo("dpmpp_2m", "DPM++ 2M"),
        SamplerInfo("dpmpp_sde", "DPM++ SDE", requires="torchsde"),
        SamplerInfo("ddim", "DDIM"),
        SamplerInfo("uni_pc", "UniPC", drops_penultimate_sigma=True),
        SamplerInfo("pndm", "PNDM", own_schedule=True),
    )
}

SCHEDULERS: tuple[str, ...] = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
    "kl_optimal",
)

#: A1111-style sampler names fold the scheduler in ("DPM++ 2M Karras"), as metadata other tools read has it.
SCHEDULER_SUFFIX = {"karras": " Karras", "exponential": " Exponential"}


def combination_error(sampler: str, scheduler: str) -> str | None:
    """Why ``sampler`` cannot run with ``scheduler`` here, or None when it can."""
    info = SAMPLERS.get(sampler)
    if info is None or scheduler not in SCHEDULERS:
        return None  # reported by the choice check instead
    if info.own_schedule and scheduler != "normal":
        return f"sampler {sampler!r} runs on diffusers' own PNDM timesteps; use scheduler 'normal' with it"
    if info.requires and importlib.util.find_spec(info.requires) is None:
        return f"sampler {sampler!r} needs the Python package {info.requires!r}, which is not installed"
    return None

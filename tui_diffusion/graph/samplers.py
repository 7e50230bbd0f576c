"""ComfyUI's sampler and scheduler names, and which pairs this engine can run.

Torch-free data: the TUI builds its select boxes from it and the validator rejects pairs the
engine cannot honour. The torch side (``pipeline/k_samplers.py``) implements every name here as a
function in sigma space; ``pipeline/schedules.py`` computes the sigmas for every scheduler.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerInfo:
    """What the engine needs to know about one ComfyUI sampler name."""

    name: str
    #: A1111-style label (metadata other tools read, "Sampler: DPM++ 2M Karras").
    label: str
    #: ComfyUI computes steps+1 sigmas and drops the penultimate one for these samplers.
    drops_penultimate_sigma: bool = False
    #: CFG++: steps along the unconditional prediction, so the denoiser must expose it (even at CFG 1).
    cfg_pp: bool = False
    #: Draws fresh noise during sampling (ancestral or SDE): the seed matters beyond the initial noise.
    stochastic: bool = False
    #: Python module the sampler needs at run time, if any.
    requires: str | None = None


def _info(name: str, label: str, **flags: Any) -> SamplerInfo:
    if name.endswith("_cfg_pp"):
        flags.setdefault("cfg_pp", True)
    return SamplerInfo(name, label, **flags)


_SDE = {"stochastic": True, "requires": "torchsde"}

# ComfyUI's KSampler list in its own order (comfy/samplers.py KSAMPLER_NAMES, then ddim and the UniPC pair),
# then pndm, which ComfyUI does not have.
SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        _info("euler", "Euler"),
        _info("euler_cfg_pp", "Euler CFG++"),
        _info("euler_ancestral", "Euler a", stochastic=True),
        _info("euler_ancestral_cfg_pp", "Euler a CFG++", stochastic=True),
        _info("heun", "Heun"),
        _info("heunpp2", "Heun++ 2"),
        _info("exp_heun_2_x0", "Exp Heun 2 x0"),
        _info("exp_heun_2_x0_sde", "Exp Heun 2 x0 SDE", stochastic=True),
        _info("dpm_2", "DPM2", drops_penultimate_sigma=True),
        _info("dpm_2_ancestral", "DPM2 a", drops_penultimate_sigma=True, stochastic=True),
        _info("lms", "LMS"),
        _info("dpm_fast", "DPM fast"),
        _info("dpm_adaptive", "DPM adaptive"),
        _info("dpmpp_2s_ancestral", "DPM++ 2S a", stochastic=True),
        _info("dpmpp_2s_ancestral_cfg_pp", "DPM++ 2S a CFG++", stochastic=True),
        _info("dpmpp_sde", "DPM++ SDE", **_SDE),
        _info("dpmpp_sde_gpu", "DPM++ SDE GPU", **_SDE),
        _info("dpmpp_2m", "DPM++ 2M"),
        _info("dpmpp_2m_cfg_pp", "DPM++ 2M CFG++"),
        _info("dpmpp_2m_sde", "DPM++ 2M SDE", **_SDE),
        _info("dpmpp_2m_sde_gpu", "DPM++ 2M SDE GPU", **_SDE),
        _info("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", **_SDE),
        _info("dpmpp_2m_sde_heun_gpu", "DPM++ 2M SDE Heun GPU", **_SDE),
        _info("dpmpp_3m_sde", "DPM++ 3M SDE", **_SDE),
        _info("dpmpp_3m_sde_gpu", "DPM++ 3M SDE GPU", **_SDE),
        _info("ddpm", "DDPM", stochastic=True),
        _info("lcm", "LCM", stochastic=True),
        _info("ipndm", "iPNDM"),
        _info("ipndm_v", "iPNDM V"),
        _info("deis", "DEIS"),
        _info("res_multistep", "Res Multistep"),
        _info("res_multistep_cfg_pp", "Res Multistep CFG++"),
        _info("res_multistep_ancestral", "Res Multistep a", stochastic=True),
        _info("res_multistep_ancestral_cfg_pp", "Res Multistep a CFG++", stochastic=True),
        _info("gradient_estimation", "Gradient Estimation"),
        _info("gradient_estimation_cfg_pp", "Gradient Estimation CFG++"),
        _info("er_sde", "ER SDE", stochastic=True),
        _info("seeds_2", "SEEDS 2", stochastic=True),
        _info("seeds_3", "SEEDS 3", stochastic=True),
        _info("sa_solver", "SA-Solver", stochastic=True),
        _info("sa_solver_pece", "SA-Solver PECE", stochastic=True),
        _info("ddim", "DDIM"),
        _info("uni_pc", "UniPC", drops_penultimate_sigma=True),
        _info("uni_pc_bh2", "UniPC BH2", drops_penultimate_sigma=True),
        _info("pndm", "PNDM"),
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
    if info.requires and importlib.util.find_spec(info.requires) is None:
        return f"sampler {sampler!r} needs the Python package {info.requires!r}, which is not installed"
    return None

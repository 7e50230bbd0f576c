"""A fresh worker's first single-file load imports no ``scipy.stats`` (diffusers' schedulers pull it in for
beta-sigma schedules only), and diffusers' schedulers imported that way still take beta sigmas and LMS steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY, TINY_XL

_LOAD = """
import json, sys, tempfile
from pathlib import Path
import diffusers, torch  # as a ready worker has them
from tui_diffusion.pipeline.device import resolve_device
from tui_diffusion.pipeline.models import load_checkpoint
from tui_diffusion.settings import DevicePolicy
loaded = load_checkpoint(Path(sys.argv[1]), resolve_device(DevicePolicy("cpu")), Path(tempfile.mkdtemp()))
out = {"loaded": loaded.model.unet is not None, "stats": "scipy.stats" in sys.modules,
       "integrate": "scipy.integrate" in sys.modules}
if len(sys.argv) > 2:  # then diffusers' schedulers of that load, with the schedules that need scipy
    from diffusers import EulerDiscreteScheduler, LMSDiscreteScheduler
    import scipy.stats
    euler = EulerDiscreteScheduler(use_beta_sigmas=True)
    euler.set_timesteps(4)
    plain = EulerDiscreteScheduler()
    plain.set_timesteps(4)
    alpha = beta = 0.6
    expected = [float(scipy.stats.beta.ppf(1 - t, alpha, beta)) for t in [0.0, 1 / 3, 2 / 3, 1.0]]
    lms = LMSDiscreteScheduler()
    lms.set_timesteps(4)
    sample = torch.ones(1, 4, 2, 2)
    for t in lms.timesteps[:3]:
        sample = lms.step(torch.full_like(sample, 0.1), t, sample).prev_sample
    out.update(beta_sigmas=[float(s) for s in euler.sigmas[:-1]], plain_sigmas=[float(s) for s in plain.sigmas[:-1]],
               ppf=expected, lms_finite=bool(torch.isfinite(sample).all()))
print(json.dumps(out))
"""


def _load(path: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _LOAD, str(path), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_first_load_imports_no_scipy_stats(models_dir: Path) -> None:
    for name in (TINY, TINY_XL):
        out = _load(models_dir / "checkpoints" / name)
        assert out["loaded"]
        assert not out["stats"], f"{name}: scipy.stats was imported by the load"
        assert not out["integrate"]


def test_diffusers_schedulers_still_take_beta_sigmas_and_lms_steps(models_dir: Path) -> None:
    out = _load(models_dir / "checkpoints" / TINY, "schedulers")
    assert out["lms_finite"]
    sigmas, plain = out["beta_sigmas"], out["plain_sigmas"]
    assert sigmas != plain  # the beta schedule was taken, not silently skipped
    assert sigmas[0] == max(plain) and sigmas[-1] == min(plain)  # the same range, spaced by the beta quantiles
    lo, hi = min(plain), max(plain)
    assert [round(s, 4) for s in sigmas] == [round(lo + p * (hi - lo), 4) for p in out["ppf"]]

"""ComfyUI's samplers as small functions of (denoiser, x, sigmas, seed), in sigma space.

``sample(name, denoiser, x, sigmas, seed=..., callback=...)`` runs one of the names in
``tui_diffusion.graph.samplers.SAMPLERS``. The formulas and defaults (eta, s_noise, r, orders) are those
of ComfyUI's ``comfy/k_diffusion/sampling.py`` and ``comfy/extra_samplers/uni_pc.py`` (k-diffusion's
samplers and their later additions), rewritten here as one function per sampler; given the same
sigmas, noise and seed they return ComfyUI's latents to float precision (``tests/test_k_samplers.py``).

The denoiser contract:

- ``denoiser(x, sigma) -> x0``: the denoised latent for the noisy latent ``x`` at ``sigma``, a 1-D tensor
  with one sigma per batch item. CFG, eps/v/flow output conversion and masks live inside it.
- ``denoiser.model_sampling``: the model sampling object (``pipeline/model_sampling.py``). Rectified-flow
  models (``is_flow``) take the ``*_RF`` branches ComfyUI takes for them and the half-log-SNR of flow.
- ``denoiser.uncond_denoised`` (optional): the unconditional x0 of the most recent call, for the
  ``*_cfg_pp`` samplers (CFG++ steps along the unconditional prediction and adds the guidance back).
  A denoiser serving a sampler whose ``SamplerInfo.cfg_pp`` is set must compute it even at CFG 1, as
  ComfyUI's ``disable_cfg1_optimization`` does; when it is absent or None the guided prediction stands in,
  so a cfg_pp sampler on a denoiser without an unconditional branch is its plain sampler.

``x`` enters already noise-scaled (``model_sampling.noise_scaling``) and leaves before
``inverse_noise_scaling``; the caller applies both. ``callback(i, x, denoised, sigma)`` is called once
per step with the step's first prediction. Ancestral samplers draw their per-step noise from a CPU
generator seeded with seed + 1, as ComfyUI does on the CPU (on any device here, so a seed means one
image everywhere); SDE samplers from a torchsde Brownian tree with entropy ``seed`` over the schedule's
sigma range, kept on the CPU, or on the latent's device for the ``*_gpu`` names as in ComfyUI. The same
seed gives ComfyUI's CPU result.

``pndm`` has no ComfyUI counterpart: it is pseudo linear multistep (PLMS, Liu et al. 2022, the PNDM
paper's fast variant) on the eps prediction, in sigma space. PLMS averages the last four eps
predictions with Adams-Bashforth weights and moves with a DDIM step; a DDIM step with a given eps is
exactly an Euler step of x = x0 + sigma * eps in sigma, so pndm is ``ipndm``'s multistep after a
pseudo-improved-Euler (Heun) first step, as the original PLMS starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from tui_diffusion.graph.samplers import SAMPLERS
from tui_diffusion.pipeline.model_sampling import ModelSampling

Tensor = torch.Tensor
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
NoiseFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser(Protocol):
    """What the samplers call: x0 from a noisy latent, and the model sampling it follows."""

    model_sampling: ModelSampling

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


class _Run:
    """One sampling run: the denoiser, the seed and the callback, shared by the step functions."""

    def __init__(self, denoiser: Denoiser, seed: int, callback: Callback | None) -> None:
        self.denoiser = denoiser
        self.ms: ModelSampling = denoiser.model_sampling
        self.seed = int(seed)
        self.callback = callback
        self.uncond: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma * x.new_ones([x.shape[0]]) if sigma.ndim == 0 else sigma
        denoised = self.denoiser(x, s)
        uncond = getattr(self.denoiser, "uncond_denoised", None)
        self.uncond = denoised if uncond is None else uncond
        return denoised

    def report(self, i: int, x: Tensor, denoised: Tensor, sigma: Tensor) -> None:
        if self.callback is not None:
            self.callback(i, x, denoised, sigma)

    def step_noise(self, x: Tensor) -> NoiseFn:
        """Per-step noise: randn of x's shape from a CPU generator seeded with seed + 1, moved to x's device.

        That is ComfyUI's noise on the CPU; ComfyUI on a GPU seeds a generator there instead, whose numbers
        differ, so here a seed gives the same image on every device.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed + 1)
        return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, generator=gen).to(x.device)

    def brownian(self, x: Tensor, sigmas: Tensor, cpu: bool = True) -> NoiseFn:
        positive = sigmas[sigmas > 0]
        return _BrownianNoise(x, positive.min(), sigmas.max(), self.seed, cpu)


class _BrownianNoise:
    """Unit-variance increments of a torchsde Brownian tree over [sigma_min, sigma_max] (ComfyUI's layout)."""

    def __init__(self, x: Tensor, sigma_min: Tensor, sigma_max: Tensor, seed: int, cpu: bool) -> None:
        import torchsde

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1
        if not t0 < t1:
            t0, t1, self.sign = t1, t0, -1
        w0 = torch.zeros_like(x)
        self.cpu = cpu
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        device, dtype = lo.device, lo.dtype
        if self.cpu:
            lo, hi = lo.detach().cpu().float(), hi.detach().cpu().float()
        w = self.tree(lo, hi).to(device=device, dtype=dtype) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


# -- shared maths -------------------------------------------------------------------------------------------
def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al.)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """Where an ancestral step lands (sigma_down) and how much fresh noise it then adds (sigma_up)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _half_log_snr(sigma: Tensor, ms: ModelSampling) -> Tensor:
    """lambda = log(alpha / sigma): -log(sigma) for VE models, logit(1 - sigma) for flow models."""
    return sigma.logit().neg() if ms.is_flow else sigma.log().neg()


def _sigma_of(half_log_snr: Tensor, ms: ModelSampling) -> Tensor:
    return half_log_snr.neg().sigmoid() if ms.is_flow else half_log_snr.neg().exp()


def _offset_first_sigma(sigmas: Tensor, ms: ModelSampling, percent: float = 1e-4) -> Tensor:
    """A flow schedule starting at sigma 1 has an infinite log-SNR there: start just below it."""
    if len(sigmas) > 1 and ms.is_flow and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = ms.percent_to_sigma(percent)
    return sigmas


def _phi1(h: Tensor) -> Tensor:
    """h * phi_1(h) of exponential integrators."""
    return torch.expm1(h)


def _phi2(h: Tensor) -> Tensor:
    """h * phi_2(h) of exponential integrators."""
    return (torch.expm1(h) - h) / h


# -- Euler, Heun and DPM-2 -------------------------------------------------------------------------------
def euler(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    if run.ms.is_flow:
        return _euler_ancestral_rf(run, x, sigmas, eta, s_noise)
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, denoised, sigmas[i])
        if down == 0:
            x = denoised
        else:
            x = x + _to_d(x, sigmas[i], denoised) * (down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


def _rf_ancestral(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A flow model's ancestral step: the sigma to step down to, the alphas and the renoise amount."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next, alpha_down, renoise


def _euler_ancestral_rf(run: _Run, x: Tensor, sigmas: Tensor, eta: float, s_noise: float) -> Tensor:
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        down, alpha_next, alpha_down, renoise = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
        ratio = down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = (alpha_next / alpha_down) * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def heun(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        run.report(i, x, denoised, sigmas[i])
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], run(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def heunpp2(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    """Heun++: a third evaluation two sigmas ahead, weighted by sigma (sd-webui-samplers-scheduler)."""
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        run.report(i, x, denoised, sigmas[i])
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], run(x_2, sigmas[i + 1]))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], run(x_2, sigmas[i + 1]))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = _to_d(x_3, sigmas[i + 2], run(x_3, sigmas[i + 2]))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def dpm_2(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            x = x + _to_d(x_2, mid, run(x_2, mid)) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    noise = run.step_noise(x)
    flow = run.ms.is_flow
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        if flow:
            down, alpha_next, alpha_down, up = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
        else:
            down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, denoised, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(down.log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            x = x + _to_d(x_2, mid, run(x_2, mid)) * (down - sigmas[i])
            if flow:
                x = (alpha_next / alpha_down) * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
            else:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


# -- linear multistep ------------------------------------------------------------------------------------
def _lms_coeff(order: int, t: Any, i: int, j: int) -> float:
    """The integral over [t_i, t_i+1] of the j-th Lagrange basis polynomial through t_i, t_i-1, ..."""
    from scipy import integrate

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(run: _Run, x: Tensor, sigmas: Tensor, order: int = 4) -> Tensor:
    sigmas_np = sigmas.detach().cpu().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [_lms_coeff(cur, sigmas_np, i, j) for j in range(cur)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


def ipndm(run: _Run, x: Tensor, sigmas: Tensor, max_order: int = 4) -> Tensor:
    """Improved PNDM: Adams-Bashforth on dx/dsigma with fixed weights (zju-pi diff-solvers)."""
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = _adams_bashforth(x, denoised, d, history, sigmas[i], sigmas[i + 1], min(max_order, i + 1))
        history = (history + [d])[-(max_order - 1):]
    return x


def _adams_bashforth(x: Tensor, denoised: Tensor, d: Tensor, history: list[Tensor], t: Tensor, t_next: Tensor,
                     order: int) -> Tensor:
    if t_next == 0:
        return denoised
    if order == 1:
        return x + (t_next - t) * d
    if order == 2:
        return x + (t_next - t) * (3 * d - history[-1]) / 2
    if order == 3:
        return x + (t_next - t) * (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
    return x + (t_next - t) * (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def ipndm_v(run: _Run, x: Tensor, sigmas: Tensor, max_order: int = 4) -> Tensor:
    """iPNDM with variable step sizes: the Adams-Bashforth weights follow the actual sigma spacing."""
    t = sigmas
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = run(x, t_cur)
        run.report(i, x, denoised, t_cur)
        d = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d
        else:
            h_n, h_1 = t_next - t_cur, t_cur - t[i - 1]
            if order == 2:
                c1 = (2 + h_n / h_1) / 2
                c2 = -(h_n / h_1) / 2
                x_next = x + (t_next - t_cur) * (c1 * d + c2 * history[-1])
            else:
                h_2 = t[i - 1] - t[i - 2]
                tmp1 = (1 - h_n / (3 * (h_n + h_1)) * (h_n * (h_n + h_1)) / (h_1 * (h_1 + h_2))) / 2
                if order == 3:
                    c1 = (2 + h_n / h_1) / 2 + tmp1
                    c2 = -(h_n / h_1) / 2 - (1 + h_1 / h_2) * tmp1
                    c3 = tmp1 * h_1 / h_2
                    x_next = x + (t_next - t_cur) * (c1 * d + c2 * history[-1] + c3 * history[-2])
                else:
                    h_3 = t[i - 2] - t[i - 3]
                    tmp2 = (((1 - h_n / (3 * (h_n + h_1))) / 2 + (1 - h_n / (2 * (h_n + h_1))) * h_n
                             / (6 * (h_n + h_1 + h_2)))
                            * (h_n * (h_n + h_1) * (h_n + h_1 + h_2)) / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3)))
                    ratio = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
                    c1 = (2 + h_n / h_1) / 2 + tmp1 + tmp2
                    c2 = -(h_n / h_1) / 2 - (1 + h_1 / h_2) * tmp1 - (1 + h_1 / h_2 + ratio) * tmp2
                    c3 = tmp1 * h_1 / h_2 + (h_1 / h_2 + ratio * (1 + h_2 / h_3)) * tmp2
                    c4 = -tmp2 * ratio * h_1 / h_2
                    x_next = x + (t_next - t_cur) * (c1 * d + c2 * history[-1] + c3 * history[-2]
                                                     + c4 * history[-3])
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


def pndm(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    """PLMS in sigma space: a Heun first step, then 2nd to 4th order Adams-Bashforth on eps (see module doc)."""
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        eps = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if not history and sigmas[i + 1] > 0:
            x_2 = x + eps * dt
            eps_2 = (x_2 - run(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (eps + eps_2) / 2 * dt
        else:
            x = x + _plms_eps(eps, history) * dt
        history = (history + [eps])[-3:]
    return x


def _plms_eps(eps: Tensor, history: list[Tensor]) -> Tensor:
    """The Adams-Bashforth combination of the current and up to three earlier eps predictions."""
    if not history:
        return eps
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def _deis_coefficients(sigmas: Tensor, max_order: int, n: int = 10000) -> list[list[Tensor]]:
    """DEIS 'tab' coefficients: the exponential integrator's Lagrange weights, integrated numerically.

    Sigmas map to the time of a VP SDE fitted to sigma 0.002..80 (EDM's range, as diff-solvers does);
    each step integrates the Lagrange basis through the previous times against that SDE's weight.
    """
    eps_s, s_min, s_max = 1e-3, torch.tensor(0.002), torch.tensor(80.0)
    beta_d = 2 * (torch.log(s_min**2 + 1) / eps_s - torch.log(s_max**2 + 1)) / (eps_s - 1)
    beta_min = torch.log(s_max**2 + 1) - 0.5 * beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    ts = ((beta_min**2 + 2 * beta_d * (sigmas.detach().cpu() ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    out: list[list[Tensor]] = []
    for i in range(len(ts) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        t_cur, t_next = ts[i], ts[i + 1]
        taus = torch.linspace(float(t_cur), float(t_next), n)
        dtau = (t_next - t_cur) / n
        prev = ts[[i - k for k in range(order)]]
        with torch.inference_mode(False), torch.enable_grad():  # the sampling loop may run in inference mode
            leaf = taus.clone().requires_grad_(True)
            b0, b1 = beta_0.clone(), beta_1.clone()
            alpha = torch.exp(-0.5 * leaf**2 * (b1 - b0) - leaf * b0)
            alpha.log().sum().backward()
            d_log_alpha = leaf.grad
            alpha = alpha.detach()
        integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
        row = []
        for j in range(order):
            poly: Any = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev[k]) / (prev[j] - prev[k]))
            row.append(torch.sum(integrand * poly) * dtau)
        out.append(row)
    return out


def deis(run: _Run, x: Tensor, sigmas: Tensor, max_order: int = 3) -> Tensor:
    coeffs = _deis_coefficients(sigmas, max_order)
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = run(x, t_cur)
        run.report(i, x, denoised, t_cur)
        d = (x - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d
        else:
            x_next = x + coeffs[i][0] * d
            for k in range(1, order):
                x_next = x_next + coeffs[i][k] * history[-k]
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


# -- DPM-Solver and DPM-Solver++ -----------------------------------------------------------------------
class _DPMSolver:
    """DPM-Solver's single-step updates in t = -log(sigma), on the eps the denoiser implies."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    @staticmethod
    def t(sigma: Tensor) -> Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        return t.neg().exp()

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.run(x, sigma)) / self.sigma(t)
        return cache[key]

    def step_1(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor]) -> Tensor:
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 1 / 2) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 1 / 3,
               r2: float = 2 / 3) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _end_sigmas(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """The range dpm_fast/dpm_adaptive integrate over: the last non-zero sigma to the first."""
    sigma_min = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast and dpm_adaptive need a schedule with at least two non-zero sigmas")
    return sigma_min, sigmas[0]


def dpm_fast(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver-fast: as many evaluations as steps, spent on 3rd-order steps evenly spaced in log-sigma."""
    sigma_min, sigma_max = _end_sigmas(sigmas)
    nfe = len(sigmas) - 1
    solver = _DPMSolver(run)
    t_start, t_end = solver.t(sigma_max.clone()), solver.t(sigma_min.clone())
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict[str, Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        eps = solver.eps(cache, "eps", x, t)
        run.report(i, x, x - solver.sigma(t) * eps, solver.sigma(t))
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next, cache)
    return x


def dpm_adaptive(run: _Run, x: Tensor, sigmas: Tensor, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81) -> Tensor:
    """DPM-Solver-23 with a PID step-size controller; only the schedule's end points matter."""
    sigma_min, sigma_max = _end_sigmas(sigmas)
    solver = _DPMSolver(run)
    t_start, t_end = solver.t(sigma_max.clone()), solver.t(sigma_min.clone())
    forward = t_end > t_start
    h = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
    errs: list[float] = []
    s, x_prev, steps = t_start, x, 0
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        cache: dict[str, Tensor] = {}
        t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - solver.sigma(s) * eps
        if order == 2:
            x_low = solver.step_1(x, s, t, cache)
            x_high = solver.step_2(x, s, t, cache)
        else:
            x_low = solver.step_2(x, s, t, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv = 1 / (float(error) + 1e-8)
        if not errs:
            errs = [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
        h *= factor
        if accept:
            x_prev, x, s = x_low, x_high, t
        run.report(steps, x, denoised, solver.sigma(s))
        steps += 1
    return x


def dpmpp_2s_ancestral(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0,
                       cfg_pp: bool = False) -> Tensor:
    if run.ms.is_flow:
        return _dpmpp_2s_ancestral_rf(run, x, sigmas, eta, s_noise, cfg_pp)
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        uncond = run.uncond if cfg_pp else denoised
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, denoised, sigmas[i])
        if down == 0:
            x = x + _to_d(x, sigmas[i], uncond) * (down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * uncond
            denoised_2 = run(x_2, (-s).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * (run.uncond if cfg_pp else denoised_2)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        if cfg_pp:
            x = x + (denoised - uncond)  # the guidance, added back at alpha = 1
    return x


def _dpmpp_2s_ancestral_rf(run: _Run, x: Tensor, sigmas: Tensor, eta: float, s_noise: float,
                           cfg_pp: bool) -> Tensor:
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        uncond = run.uncond if cfg_pp else denoised
        down, alpha_next, alpha_down, renoise = _rf_ancestral(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], uncond) * (down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s: Any = 0.9999
            else:
                lam, lam_down = ((1 - sigmas[i]) / sigmas[i]).log(), ((1 - down) / down).log()
                sigma_s = ((lam + (lam_down - lam) / 2).exp() + 1) ** -1
            ratio_s = sigma_s / sigmas[i]
            u = ratio_s * x + (1 - ratio_s) * uncond
            d_i = run(u, sigma_s if isinstance(sigma_s, Tensor) else torch.tensor(sigma_s, dtype=x.dtype))
            ratio_down = down / sigmas[i]
            x = ratio_down * x + (1 - ratio_down) * (run.uncond if cfg_pp else d_i)
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_next / alpha_down) * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
        if cfg_pp:
            x = x + (1 - sigmas[i + 1]) * (denoised - uncond)
    return x


def dpmpp_sde(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0, r: float = 1 / 2,
              cpu_noise: bool = True) -> Tensor:
    """DPM-Solver++ (stochastic), a midpoint evaluation at r of the step in log-SNR."""
    if len(sigmas) <= 1:
        return x
    noise = run.brownian(x, sigmas, cpu_noise)
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _half_log_snr(sigmas[i], ms), _half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        fac = 1 / (2 * r)
        sigma_s1 = _sigma_of(lam_s1, ms)
        alpha_s, alpha_s1, alpha_t = sigmas[i] * lam_s.exp(), sigma_s1 * lam_s1.exp(), sigmas[i + 1] * lam_t.exp()
        sd, su = _ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s1 * noise(sigmas[i], sigma_s1) * s_noise * su
        denoised_2 = run(x_2, sigma_s1)
        sd, su = _ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def dpmpp_2m(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    old = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        target = denoised
        if old is not None and sigmas[i + 1] != 0:
            r = (t + sigmas[i - 1].log()) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * target
        old = denoised
    return x


def dpmpp_2m_cfg_pp(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        uncond = run.uncond
        run.report(i, x, denoised, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t + sigmas[i - 1].log()) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def dpmpp_2m_sde(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint", cpu_noise: bool = True) -> Tensor:
    if len(sigmas) <= 1:
        return x
    noise = run.brownian(x, sigmas, cpu_noise)
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    old = h = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigmas[i], ms), _half_log_snr(sigmas[i + 1], ms)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old, h_last = denoised, h
    return x


def dpmpp_3m_sde(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0,
                 cpu_noise: bool = True) -> Tensor:
    if len(sigmas) <= 1:
        return x
    noise = run.brownian(x, sigmas, cpu_noise)
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _half_log_snr(sigmas[i], ms), _half_log_snr(sigmas[i + 1], ms)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * ((denoised - d_1) / (h_1 / h))
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


# -- DDPM and LCM ------------------------------------------------------------------------------------------
def ddpm(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    """DDPM's ancestral step in VP space, moved back to sigma space after each step."""
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = run(x, sigma)
        run.report(i, x, denoised, sigma)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        ac, ac_prev = 1 / (sigma * sigma + 1), 1 / (sigma_prev * sigma_prev + 1)
        alpha = ac / ac_prev
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - ac).sqrt())
        if sigma_prev > 0:
            mu = mu + ((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt() * noise(sigma, sigma_prev)
        x = mu
        if sigma_prev != 0:
            x = x * torch.sqrt(1.0 + sigma_prev**2.0)
    return x


def lcm(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    """Latent consistency: jump to the prediction, then noise it afresh to the next sigma."""
    noise = run.step_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = run.ms.noise_scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x)
    return x


# -- exponential integrators in log-SNR: res_multistep, SEEDS, ER-SDE, SA-Solver -------------------------------
def res_multistep(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 0.0, s_noise: float = 1.0,
                  cfg_pp: bool = False) -> Tensor:
    """RES second-order multistep (arXiv 2308.02157); ancestral with eta > 0."""
    noise = run.step_noise(x)
    old_denoised = old_down = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        uncond = run.uncond
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        run.report(i, x, denoised, sigmas[i])
        if down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + _to_d(x, sigmas[i], uncond) * down
            else:
                x = x + _to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = -sigmas[i].log(), -old_down.log(), -down.log(), -sigmas[i - 1].log()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
                x = (-h).exp() * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        old_denoised = uncond if cfg_pp else denoised
        old_down = down if isinstance(down, Tensor) else torch.as_tensor(down)
    return x


def gradient_estimation(run: _Run, x: Tensor, sigmas: Tensor, ge_gamma: float = 2.0, cfg_pp: bool = False) -> Tensor:
    """Euler with the change of the derivative extrapolated (arXiv openreview o2ND9v0CeK)."""
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        d = _to_d(x, sigmas[i], run.uncond if cfg_pp else denoised)
        run.report(i, x, denoised, sigmas[i])
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def er_sde(run: _Run, x: Tensor, sigmas: Tensor, s_noise: float = 1.0, max_stage: int = 3) -> Tensor:
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (arXiv 2309.06169)."""
    noise = run.step_noise(x)

    def scaler(v: Tensor) -> Tensor:
        return v * ((v**0.3).exp() + 10.0)

    points = 200.0
    index = torch.arange(0, points, dtype=torch.float32, device=x.device)
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    er_lambdas = _half_log_snr(sigmas, ms).neg().exp()  # sigma_t / alpha_t
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = scaler(lam_t) / scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / points
                pos = lam_t + index * step
                scaled = scaler(pos)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * scaler(lam_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((pos - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                amount = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * amount
        old_denoised = denoised
    return x


def seeds_2(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
            solver_type: str = "phi_1") -> Tensor:
    """SEEDS-2, stochastic explicit exponential derivative-free solver, 2 stages (arXiv 2305.14267)."""
    noise = run.step_noise(x)
    inject = eta > 0 and s_noise > 0
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _half_log_snr(sigmas[i], ms), _half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1 = torch.lerp(lam_s, lam_t, r)
        sigma_s1 = _sigma_of(lam_s1, ms)
        alpha_s1, alpha_t = sigma_s1 * lam_s1.exp(), sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s1 * _phi1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = run(x_2, sigma_s1)
        if solver_type == "phi_1":
            x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
                 - alpha_t * _phi1(-h_eta) * torch.lerp(denoised, denoised_2, fac))
        else:
            b2 = _phi2(-h_eta) / r
            b1 = _phi1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = (r - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def seeds_3(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1.0 / 3,
            r_2: float = 2.0 / 3) -> Tensor:
    """SEEDS-3, three stages (arXiv 2305.14267)."""
    noise = run.step_noise(x)
    inject = eta > 0 and s_noise > 0
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _half_log_snr(sigmas[i], ms), _half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1, lam_s2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_s1, sigma_s2 = _sigma_of(lam_s1, ms), _sigma_of(lam_s2, ms)
        alpha_s1, alpha_s2 = sigma_s1 * lam_s1.exp(), sigma_s2 * lam_s2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s1 * _phi1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = run(x_2, sigma_s1)
        a3_2 = r_2 / r_1 * _phi2(-r_2 * h_eta)
        a3_1 = _phi1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s1, sigma_s2)
            x_3 = x_3 + sde_noise * sigma_s2 * s_noise
        denoised_3 = run(x_3, sigma_s2)
        b3 = _phi2(-h_eta) / r_2
        b1 = _phi1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_s2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def _sa_exponential_coeffs(s: Tensor, t: Tensor, order: int, tau: float) -> Tensor:
    """(1 + tau^2) * integral_s^t exp((1 + tau^2) x) x^p dx for p < order, exp((1 + tau^2) t) factored out."""
    tau_mul = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    coeff = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (coeff.exp() * signs).tril() @ terms


def _sa_b_coeffs(sigma_next: Tensor, lambdas: Tensor, lam_s: Tensor, lam_t: Tensor, tau: float) -> Tensor:
    """SA-Solver's weights for the stored predictions at ``lambdas`` (eqs. 15 and 18)."""
    n = lambdas.shape[0]
    integrals = torch.linalg.solve(torch.vander(lambdas, n, increasing=True).T,
                                   _sa_exponential_coeffs(lam_s, lam_t, n, tau))
    return sigma_next * lam_t.exp() * integrals


def sa_solver(run: _Run, x: Tensor, sigmas: Tensor, s_noise: float = 1.0, predictor_order: int = 3,
              corrector_order: int = 4, use_pece: bool = False) -> Tensor:
    """Stochastic Adams predictor-corrector (SA-Solver, NeurIPS 2023); noise between 20% and 80% of the walk."""
    if len(sigmas) <= 1:
        return x
    noise_fn = run.step_noise(x)
    ms = run.ms
    sigmas = _offset_first_sigma(sigmas, ms)
    lambdas = _half_log_snr(sigmas, ms)
    start, end = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)

    def tau_of(sigma: Tensor) -> float:
        return 1.0 if start >= float(sigma) >= end else 0.0

    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h: Any = 0.0
    tau = 0.0
    noise: Any = 0.0
    preds: list[Tensor] = []
    lower_to_end = float(sigmas[-1]) == 0
    for i in range(len(sigmas) - 1):
        denoised = run(x_pred, sigmas[i])
        run.report(i, x_pred, denoised, sigmas[i])
        preds = (preds + [denoised])[-max_order:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_to_end:
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)
        if c_order == 0:
            x = x_pred
        else:
            b = _sa_b_coeffs(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            corr = torch.tensordot(torch.stack(preds[-c_order:], dim=1), b, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau**2) * h).exp() * x + corr
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = run(x, sigmas[i])
                preds[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_of(sigmas[i + 1])
            b = _sa_b_coeffs(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
            pred = torch.tensordot(torch.stack(preds[-p_order:], dim=1), b, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau**2) * h).exp() * x + pred
            if tau > 0 and s_noise > 0:
                noise = (noise_fn(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise)
                x_pred = x_pred + noise
    return x_pred


# -- CFG++ variants that are not a flag of the plain sampler ---------------------------------------------------
def euler_ancestral_cfg_pp(run: _Run, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler (ancestral) CFG++: renoise along the unconditional prediction, step to the guided one."""
    noise = run.step_noise(x)
    ms = run.ms
    for i in range(len(sigmas) - 1):
        denoised = run(x, sigmas[i])
        uncond = run.uncond
        run.report(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * _half_log_snr(sigmas[i], ms).exp()
        alpha_t = sigmas[i + 1] * _half_log_snr(sigmas[i + 1], ms).exp()
        d = _to_d(x, sigmas[i], alpha_s * uncond)
        down, up = _ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
        x = alpha_t * denoised + alpha_t * down * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


# -- UniPC -----------------------------------------------------------------------------------------------------
def _vp(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """alpha, sigma and half-log-SNR of the VP process with this VE sigma, computed as ComfyUI does (float32)."""
    log_alpha = 0.5 * torch.log(1 / (sigma * sigma + 1))
    alpha = torch.exp(log_alpha)
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
    lam = log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
    return alpha, std, lam


def _unipc(run: _Run, x: Tensor, sigmas: Tensor, variant: str) -> Tensor:
    """UniPC multistep predictor-corrector (Zhao et al. 2023) on x0 predictions, in VP space, lower order at the end.

    As ComfyUI does, a final sigma of 0 is replaced by 0.001 (the log-SNR must stay finite) and the result is
    divided by that step's alpha; flow models are treated with the same VP conversion. ComfyUI makes that
    replacement in the caller's sigma tensor, so its inverse noise scaling then runs at sigma 0.001: a flow
    model's result comes out divided by 0.999. That is reproduced here (the caller's inverse scaling at
    sigma 0 is the identity), so flow images match ComfyUI's. With a single step (two sigmas) ComfyUI's UniPC
    takes no step at all and returns the scaled noise; here it takes one first-order step.
    """
    ts = sigmas.clone()
    quirk = bool(ts[-1] == 0) and run.ms.is_flow
    if ts[-1] == 0:
        ts[-1] = 0.001
    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)

    def model_x0(xv: Tensor, t: Tensor) -> Tensor:
        sigma = t * xv.new_ones([xv.shape[0]])
        s = sigma.view(sigma.shape[:1] + (1,) * (xv.ndim - 1))
        x_in = xv * ((s**2 + 1.0) ** 0.5)
        eps = (x_in - run(x_in, sigma)) / s
        alpha, std, _ = _vp(t)
        return (xv - std * eps) / alpha

    def update(xv: Tensor, models: list[Tensor], t_list: list[Tensor], t: Tensor, k: int,
               use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        t_prev = t_list[-1]
        m_prev = models[-1]
        _, std_prev, lam_prev = _vp(t_prev)
        alpha_t, std_t, lam_t = _vp(t)
        h = lam_t - lam_prev
        rks: list[Any] = []
        d1s: list[Tensor] = []
        for j in range(1, k):
            rk = (_vp(t_list[-(j + 1)])[2] - lam_prev) / h
            rks.append(rk)
            d1s.append((models[-(j + 1)] - m_prev) / rk)
        rks.append(1.0)
        rks_t = torch.tensor(rks, device=xv.device)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b, fact = [], [], 1
        for j in range(1, k + 1):
            rows.append(torch.pow(rks_t, j - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        r_mat = torch.stack(rows)
        b_t = torch.tensor(b, device=xv.device)
        d1 = torch.stack(d1s, dim=1) if d1s else None
        x_base = std_t / std_prev * xv - alpha_t * h_phi_1 * m_prev
        if d1 is not None:
            rhos_p = torch.tensor([0.5], device=xv.device) if k == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_t[:-1])
            x_t = x_base - alpha_t * b_h * torch.einsum("k,bk...->b...", rhos_p, d1)
        else:
            x_t = x_base
        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=xv.device) if k == 1 else torch.linalg.solve(r_mat, b_t)
            model_t = model_x0(x_t, t)
            corr = torch.einsum("k,bk...->b...", rhos_c[:-1], d1) if d1 is not None else 0
            x_t = x_base - alpha_t * b_h * (corr + rhos_c[-1] * (model_t - m_prev))
        return x_t, model_t

    models = [model_x0(x, ts[0])]
    t_list = [ts[0]]
    run.report(0, x, models[-1], ts[0])
    for step_index in range(1, steps):
        if step_index < order:
            x, m = update(x, models, t_list, ts[step_index], step_index, True)
            models.append(m if m is not None else model_x0(x, ts[step_index]))
            t_list.append(ts[step_index])
        else:
            last = step_index == steps - 1
            for step in range(step_index, step_index + 1 + int(last)):
                k = min(order, steps + 1 - step)
                x, m = update(x, models, t_list, ts[step], k, step != steps)
                models = models[1:] + models[-1:] if len(models) == order else models
                t_list = t_list[1:] + [ts[step]] if len(t_list) == order else t_list[:-1] + [ts[step]]
                if step < steps:
                    models[-1] = m if m is not None else model_x0(x, ts[step])
        run.report(step_index, x, models[-1], ts[step_index])
    if steps == 1:
        x, _ = update(x, models, t_list, ts[1], 1, False)
    x = x / _vp(ts[-1])[0]
    return run.ms.inverse_noise_scaling(ts[-1], x) if quirk else x


def uni_pc(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    return _unipc(run, x, sigmas, "bh1")


def uni_pc_bh2(run: _Run, x: Tensor, sigmas: Tensor) -> Tensor:
    return _unipc(run, x, sigmas, "bh2")


# -- the table -------------------------------------------------------------------------------------------------
def _with(fn: Callable[..., Tensor], **options: Any) -> Callable[[_Run, Tensor, Tensor], Tensor]:
    return lambda run, x, sigmas: fn(run, x, sigmas, **options)


SAMPLER_FUNCTIONS: dict[str, Callable[[_Run, Tensor, Tensor], Tensor]] = {
    "euler": euler,
    "euler_cfg_pp": _with(euler_ancestral_cfg_pp, eta=0.0, s_noise=0.0),
    "euler_ancestral": euler_ancestral,
    "euler_ancestral_cfg_pp": euler_ancestral_cfg_pp,
    "heun": heun,
    "heunpp2": heunpp2,
    "exp_heun_2_x0": _with(seeds_2, eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"),
    "exp_heun_2_x0_sde": _with(seeds_2, r=1.0, solver_type="phi_2"),
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpm_fast": dpm_fast,
    "dpm_adaptive": dpm_adaptive,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": _with(dpmpp_2s_ancestral, cfg_pp=True),
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_sde_gpu": _with(dpmpp_sde, cpu_noise=False),
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_cfg_pp": dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": _with(dpmpp_2m_sde, cpu_noise=False),
    "dpmpp_2m_sde_heun": _with(dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": _with(dpmpp_2m_sde, solver_type="heun", cpu_noise=False),
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": _with(dpmpp_3m_sde, cpu_noise=False),
    "ddpm": ddpm,
    "lcm": lcm,
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "deis": deis,
    "res_multistep": res_multistep,
    "res_multistep_cfg_pp": _with(res_multistep, cfg_pp=True),
    "res_multistep_ancestral": _with(res_multistep, eta=1.0),
    "res_multistep_ancestral_cfg_pp": _with(res_multistep, eta=1.0, cfg_pp=True),
    "gradient_estimation": gradient_estimation,
    "gradient_estimation_cfg_pp": _with(gradient_estimation, cfg_pp=True),
    "er_sde": er_sde,
    "seeds_2": seeds_2,
    "seeds_3": seeds_3,
    "sa_solver": sa_solver,
    "sa_solver_pece": _with(sa_solver, use_pece=True),
    "ddim": euler,  # ComfyUI's ddim is Euler on the chosen schedule
    "uni_pc": uni_pc,
    "uni_pc_bh2": uni_pc_bh2,
    "pndm": pndm,
}


def sample(name: str, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, seed: int,
           callback: Callback | None = None) -> Tensor:
    """Run sampler ``name`` from the noise-scaled ``x`` along ``sigmas``; see the module docstring."""
    fn = SAMPLER_FUNCTIONS.get(name)
    if fn is None or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    if len(sigmas) <= 1:
        return x
    sigmas = sigmas.to(device=x.device)
    with torch.no_grad():
        return fn(_Run(denoiser, seed, callback), x, sigmas)

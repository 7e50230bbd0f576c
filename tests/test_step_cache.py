"""Opt-in step caching (issue 17, item 4): diffusers' First Block Cache and TaylorSeer hooks behind the
ApplyStepCache node and the ``step_cache`` setting, on tiny Flux.1, SD3 and SD1.x models. What is checked is
what the hooks do (which blocks run at which step, how close the image stays), that the loaded network is left
as it was, and the clear errors; the speed-up is measured by benchmarks/step_cache.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TINY, txt2img
from tests.dit_helpers import CPU
from tests.test_dit_loaders import _ctx
from tui_diffusion.pipeline import checkpoint_writer_dit as w
from tui_diffusion.pipeline import models_dit as md
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.registry import implementations
from tui_diffusion.pipeline.step_cache import StepCache, applicable

STEPS = 4


def dit(kind: str) -> Any:
    if kind == "flux":
        net = w.build_flux_transformer(w.TinyFlux(layers=2, single_layers=2))
    else:  # SD3's last block returns no text stream (context_pre_only)
        net = w.build_sd3_transformer(w.TinySD3(depth=3))
    return md.model_handle(kind, net, CPU, f"tiny {kind}")


def conds(model: Any) -> tuple[list, list]:
    cfg = model.unet.config
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 8, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen)
    return [[emb, {"pooled_output": pooled}]], [[emb * 0, {"pooled_output": pooled * 0}]]


def sample(ctx: Any, model: Any, steps: int = STEPS) -> torch.Tensor:
    positive, negative = conds(model)
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    (out,) = implementations()["KSampler"](ctx, model=model, seed=3, steps=steps, cfg=2.0, sampler_name="euler",
                                           scheduler="simple", positive=positive, negative=negative,
                                           latent_image=latent).outputs
    return out["samples"]


def cached(ctx: Any, model: Any, method: str, **inputs: Any) -> Any:
    (out,) = implementations()["ApplyStepCache"](ctx, model=model, method=method, **inputs).outputs
    return out


class Calls:
    """How often each block's attention ran (a skipped block never reaches its attention)."""

    def __init__(self, net: Any) -> None:
        self.blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                       for b in getattr(net, name, [])]
        self.counts = [0] * len(self.blocks)
        self.handles = [b.attn.register_forward_hook(self._hit(i)) for i, b in enumerate(self.blocks)]

    def _hit(self, i: int) -> Any:
        def hit(*_: Any) -> None:
            self.counts[i] += 1
        return hit

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def no_hooks(net: torch.nn.Module) -> bool:
    return all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in net.modules()) and \
        not net._forward_pre_hooks


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_first_block_cache_skips_the_rest_while_the_first_block_barely_changes(tmp_path: Path, kind: str) -> None:
    """Threshold 0: every step runs every block and the latent is the uncached one, exactly. A threshold no
    change reaches: after the first step only the first block runs (and SD3's last, which the cache cannot
    span), the others' residual reused: a different latent, of the same scale."""
    ctx, model = _ctx(tmp_path, tmp_path), dit(kind)
    plain = sample(ctx, model)
    calls = Calls(model.unet)
    exact = sample(ctx, cached(ctx, model, "first_block_cache", threshold=0.0))
    assert calls.counts == [STEPS] * len(calls.blocks)  # one batched cond+uncond call per step
    torch.testing.assert_close(exact, plain, rtol=0, atol=0)
    calls.counts = [0] * len(calls.blocks)
    skipped = sample(ctx, cached(ctx, model, "first_block_cache", threshold=1e9))
    calls.close()
    last = STEPS if kind == "sd3" else 1
    assert calls.counts == [STEPS] + [1] * (len(calls.blocks) - 2) + [last]
    assert not torch.equal(skipped, plain) and torch.isfinite(skipped).all()
    assert float((skipped - plain).norm() / plain.norm()) < 1.0
    assert no_hooks(model.unet)
    torch.testing.assert_close(sample(ctx, model), plain, rtol=0, atol=0)  # the cached network is unchanged


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_taylorseer_runs_the_blocks_every_interval_and_extrapolates_between(tmp_path: Path, kind: str) -> None:
    """Warmup 1, interval 2: the blocks run at calls 0 and 2 of 4 (diffusers' schedule); the latent stays
    close to the uncached one."""
    ctx, model = _ctx(tmp_path, tmp_path), dit(kind)
    plain = sample(ctx, model)
    calls = Calls(model.unet)
    out = sample(ctx, cached(ctx, model, "taylorseer", interval=2, warmup=1))
    calls.close()
    full = 2
    expected = [full] * len(calls.blocks)
    if kind == "sd3":
        expected[-1] = STEPS  # the last block always runs (on the zeros the skipped ones leave)
    assert calls.counts == expected
    assert not torch.equal(out, plain)
    assert float((out - plain).norm() / plain.norm()) < 0.5
    assert no_hooks(model.unet)


def test_state_is_fresh_for_each_run_and_kept_apart_per_input_shape(tmp_path: Path) -> None:
    """Two runs of the same cached model give the same latent (no state carried over); a 6x4 latent after a
    4x4 one runs its own first full steps instead of reusing the other shape's residuals."""
    ctx, model = _ctx(tmp_path, tmp_path), dit("flux")
    fbc = cached(ctx, model, "first_block_cache", threshold=1e9)
    a, b = sample(ctx, fbc), sample(ctx, fbc)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    positive, negative = conds(model)
    calls = Calls(model.unet)
    from tui_diffusion.pipeline.ksampler import run_sampler
    from tui_diffusion.pipeline.schedules import ksampler_sigmas

    sigmas = ksampler_sigmas(model.model_sampling, "euler", "simple", 2, 1.0)
    for shape in ((4, 4), (6, 4)):
        run_sampler(ctx, fbc, "euler", sigmas, 1, True, positive, negative, 2.0,
                    {"samples": torch.zeros(1, 16, *shape)})
    calls.close()
    assert calls.counts[1:] == [2, 2, 2]  # one full first step per shape


def test_unets_take_taylorseer_and_refuse_first_block_cache(tmp_path: Path, models_dir: Path) -> None:
    """On an SD1.x UNet TaylorSeer extrapolates the transformer blocks' attention and feed-forward layers;
    First Block Cache is refused at the node with what to use instead."""
    from tests.test_dit_loaders import _ctx as make_ctx

    ctx = make_ctx(models_dir, tmp_path)
    nodes = implementations()
    model, clip, _ = nodes["CheckpointLoaderSimple"](ctx, ckpt_name=TINY).outputs
    with pytest.raises(NodeError, match="SD1.x model: first_block_cache applies to transformer models .* use "
                                        "taylorseer"):
        cached(ctx, model, "first_block_cache")
    (positive,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="a cat").outputs
    (negative,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="").outputs
    (latent,) = nodes["EmptyLatentImage"](ctx, width=64, height=64, batch_size=1).outputs

    def run(m: Any) -> torch.Tensor:
        (out,) = nodes["KSampler"](ctx, model=m, seed=1, steps=STEPS, cfg=7.0, sampler_name="euler",
                                   scheduler="normal", positive=positive, negative=negative,
                                   latent_image=latent).outputs
        return out["samples"]

    # the layer inside: a torch hook on attn1 itself fires whether TaylorSeer computes it or extrapolates
    attn = [m for n, m in model.unet.named_modules() if n.endswith("transformer_blocks.0.attn1.to_q")]
    counts = [0]
    handles = [a.register_forward_hook(lambda *_: counts.__setitem__(0, counts[0] + 1)) for a in attn]
    plain = run(model)
    uncached_calls, counts[0] = counts[0], 0
    out = run(cached(ctx, model, "taylorseer", interval=2, warmup=1))
    for h in handles:
        h.remove()
    assert uncached_calls == STEPS * len(attn) and counts[0] == 2 * len(attn)
    assert not torch.equal(out, plain) and float((out - plain).norm() / plain.norm()) < 0.5
    assert no_hooks(model.unet)
    torch.testing.assert_close(run(model), plain, rtol=0, atol=0)


def test_the_setting_caches_every_model_that_no_node_set(tmp_path: Path) -> None:
    ctx, model = _ctx(tmp_path, tmp_path), dit("flux")
    plain = sample(ctx, model)
    by_node = sample(ctx, cached(ctx, model, "taylorseer"))  # the node's defaults are the setting's
    ctx.engine.step_cache = "taylorseer"
    torch.testing.assert_close(sample(ctx, model), by_node, rtol=0, atol=0)
    torch.testing.assert_close(sample(ctx, cached(ctx, model, "none")), plain, rtol=0, atol=0)  # the node wins
    from tui_diffusion.pipeline.step_cache import step_cache_applied

    # a network the setting's method cannot take: the sampler fails with why, before any step
    with pytest.raises(NodeError, match="step cache: first_block_cache applies to transformer models"):
        with step_cache_applied(torch.nn.Linear(2, 2), StepCache("first_block_cache")):
            pass


def test_spec_and_validation() -> None:
    from tui_diffusion.graph import NODE_SPECS, Workflow, validate_workflow
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.settings import STEP_CACHE_METHODS

    spec = NODE_SPECS["ApplyStepCache"]
    assert spec.input("method").choices == STEP_CACHE_METHODS and [o.type for o in spec.outputs] == ["MODEL"]
    data = txt2img()
    data["20"] = {"class_type": "ApplyStepCache", "inputs": {"model": ["4", 0], "method": "teacache"}}
    data["3"]["inputs"]["model"] = ["20", 0]
    issues = [str(i) for i in validate_workflow(Workflow.from_data(data), ModelPaths(Path("/nonexistent")))]
    assert "node 20 'Apply Step Cache', input 'method': 'teacache' is not one of: none, first_block_cache, taylorseer" \
        in issues
    assert applicable(torch.nn.Linear(2, 2), "taylorseer") == "taylorseer found no layers it knows in a Linear"
    with pytest.raises(NodeError, match="not one of none, first_block_cache, taylorseer"):
        StepCache("teacache")


@pytest.mark.slow
def test_benchmark_runs_and_rewrites_only_its_docs_section(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nload figures\n\n<!-- step_cache:begin -->\nold\n<!-- step_cache:end -->\n\ntail\n")
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_cache", "--smallest", "--repeat", "1", "--json",
                           str(tmp_path / "r.json"), "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    rows = results["step_cache"]
    assert results["preview"]["taesd_s"] > results["preview"]["latent2rgb_s"] > 0  # a decode, not a skipped call
    assert {r["method"] for r in rows} == {"first_block_cache", "taylorseer"}
    ran = [r for r in rows if "skipped" not in r]
    assert all(r["speedup"] > 0 and 0 < r["full_calls_share"] <= 1 and r["rel_l2"] >= 0 for r in ran)
    assert [r["model"].split(" ")[0] for r in rows if "skipped" in r] == ["SD1.x", "SD1.x"]  # FBC refuses UNets
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nload figures\n\n<!-- step_cache:begin -->") and text.endswith("\n\ntail\n")
    assert "\nold\n" not in text
    assert "## Step caching" in text and "taylorseer (interval 3, warmup 2)" in text


def test_each_kind_of_call_keeps_its_own_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook state is named by the input's shape and the call's place among that step's calls of that shape
    (area conditionings of one size run one after the other), so two areas never share cached work."""
    import diffusers.hooks.hooks as dh

    from tui_diffusion.pipeline.step_cache import step_cache_applied

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
            self.proj_out = torch.nn.Linear(4, 4)

        def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            for block in self.transformer_blocks:
                hidden_states = block(hidden_states)
            return self.proj_out(hidden_states)

    names: list[str | None] = []
    real = dh._set_cache_context
    monkeypatch.setattr(dh, "_set_cache_context",
                        lambda net, ctx: (names.append(ctx.name if ctx else None), real(net, ctx))[1])
    net = Net()
    with step_cache_applied(net, StepCache("taylorseer", interval=2, warmup=1)):
        for t in (1.0, 0.5):
            for shape in ((1, 3, 4), (1, 3, 4), (2, 5, 4)):  # two areas of one size, then a batched call
                net(hidden_states=torch.randn(*shape), timestep=torch.tensor([t]))
    assert names == ["1x3x4#0", "1x3x4#1", "2x5x4#0"] * 2 + [None]
    assert no_hooks(net)

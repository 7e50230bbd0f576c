"""Step caching and preview cost, measured (issues 17 item 4 and 16 item 8).

    python -m benchmarks.step_cache [--smallest] [--repeat N] [--json FILE] [--docs docs/benchmarks.md]

For each model and cache method: the KSampler node with the cache (ApplyStepCache) against the same node
without it, runs alternating, same seed; the speed-up, the share of network calls that ran every block, and
how far the final latent moved (relative L2 and largest difference) from the uncached one. The models are
reduced-size random-weight networks of the real architectures on the CPU (Flux.1, SD3, SD1.x), so the
speed-up is the hooks' share of the work on those shapes, and whether First Block Cache skips depends on how
much a random first block's output moves between steps, which is not what a trained model does: read the
skip share beside each speed-up. Also the cost of one preview: a TAESD decode (the real decoder's size,
random weights) against latent-to-RGB. ``--docs`` rewrites this benchmark's section of docs/benchmarks.md
(between its markers; the rest of the file is left alone). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- step_cache:begin -->", "<!-- step_cache:end -->"


def _median(values: list[float]) -> float:
    return statistics.median(values)


class _Counter:
    """Calls of one late layer: how many network calls ran the whole network."""

    def __init__(self, module: Any) -> None:
        self.n = 0
        self.handle = module.register_forward_hook(self._hit)

    def _hit(self, *_: Any) -> None:
        self.n += 1


def _models(smallest: bool, work: Path) -> list[tuple[str, Any, dict[str, Any], Any]]:
    """(label, model handle, sampling inputs, the layer whose calls tell a full network call)."""
    import torch

    from tui_diffusion.pipeline import checkpoint_writer_dit as w
    from tui_diffusion.pipeline import models_dit as md
    from tui_diffusion.pipeline.checkpoint_writer import TinySD1, write_sd1_checkpoint
    from tui_diffusion.pipeline.device import Device
    from tui_diffusion.pipeline.registry import implementations

    cpu = Device(torch.device("cpu"), torch.float32, torch.float32, "CPU")
    nodes = implementations()
    size = 64 if smallest else 256
    steps = 6 if smallest else 10
    gen = torch.Generator().manual_seed(0)
    out = []

    flux = w.build_flux_transformer(w.TinyFlux(heads=1 if smallest else 2, layers=1 if smallest else 2,
                                               single_layers=2 if smallest else 6))
    emb = torch.randn(1, 16, flux.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(1, flux.config.pooled_projection_dim, generator=gen)
    cond = [[emb, {"pooled_output": pooled, "guidance": 3.5}]]
    out.append((f"Flux.1 ({sum(p.numel() for p in flux.parameters()) / 1e6:.1f} M, {size}px, {steps} steps, cfg 1)",
                md.model_handle("flux", flux, cpu, "flux"),
                {"positive": cond, "negative": cond, "cfg": 1.0, "steps": steps, "scheduler": "simple",
                 "latent_image": {"samples": torch.zeros(1, 16, size // 8, size // 8)}},
                flux.single_transformer_blocks[-1].attn))

    sd3 = w.build_sd3_transformer(w.TinySD3(depth=3 if smallest else 6))
    emb = torch.randn(1, 16, sd3.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(1, sd3.config.pooled_projection_dim, generator=gen)
    out.append((f"SD3 ({sum(p.numel() for p in sd3.parameters()) / 1e6:.1f} M, {size}px, {steps} steps, cfg 3.5)",
                md.model_handle("sd3", sd3, cpu, "sd3"),
                {"positive": [[emb, {"pooled_output": pooled}]],
                 "negative": [[emb * 0, {"pooled_output": pooled * 0}]], "cfg": 3.5, "steps": steps,
                 "scheduler": "sgm_uniform", "latent_image": {"samples": torch.zeros(1, 16, size // 8, size // 8)}},
                sd3.transformer_blocks[-2].attn))

    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.models import ModelCache

    sizes = TinySD1() if smallest else TinySD1(unet_channels=(64, 128, 128), unet_attention=(True, True, False),
                                               transformer_depth=1)
    write_sd1_checkpoint(work / "checkpoints" / "sd1.safetensors", sizes, seed=0)
    ctx = NodeContext(EngineState(cpu, ModelCache(2), ModelPaths(work), work / "out", work / "tmp", work / "cfg"),
                      "1", {}, lambda *a: None, lambda: False)
    model, clip, _ = nodes["CheckpointLoaderSimple"](ctx, ckpt_name="sd1.safetensors").outputs
    (positive,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="a lighthouse at dusk").outputs
    (negative,) = nodes["CLIPTextEncode"](ctx, clip=clip, text="").outputs
    late = [m for n, m in model.unet.named_modules() if n.endswith("transformer_blocks.0.attn1.to_q")][-1]
    out.append((f"SD1.x UNet ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f} M, {size}px, {steps} "
                "steps, cfg 7)", model,
                {"positive": positive, "negative": negative, "cfg": 7.0, "steps": steps, "scheduler": "normal",
                 "latent_image": {"samples": torch.zeros(1, 4, size // 8, size // 8)}}, late))
    return out


METHODS = (("first_block_cache", {"threshold": 0.1}), ("first_block_cache", {"threshold": 0.5}),
           ("taylorseer", {"interval": 3, "warmup": 2}))


def step_cache(smallest: bool, repeat: int, work: Path) -> list[dict[str, Any]]:
    import torch

    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.device import Device
    from tui_diffusion.pipeline.errors import NodeError
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.pipeline.registry import implementations

    nodes = implementations()
    cpu = Device(torch.device("cpu"), torch.float32, torch.float32, "CPU")
    ctx = NodeContext(EngineState(cpu, ModelCache(2), ModelPaths(work), work / "out", work / "tmp", work / "cfg"),
                      "1", {}, lambda *a: None, lambda: False)
    rows = []
    for label, model, inputs, late in _models(smallest, work):
        def run(m: Any, inputs: dict[str, Any] = inputs) -> Any:
            (out,) = nodes["KSampler"](ctx, model=m, seed=1, sampler_name="euler", denoise=1.0, **inputs).outputs
            return out["samples"]

        run(model)  # warm-up: first-call allocations
        for method, params in METHODS:
            try:
                (cached,) = nodes["ApplyStepCache"](ctx, model=model, method=method, **params).outputs
            except NodeError as exc:
                rows.append({"model": label, "method": method, "params": params, "skipped": str(exc)})
                continue
            plain_s, cached_s, plain_wall, cached_wall = [], [], [], []
            counter = _Counter(late)
            for _ in range(repeat):  # alternating, so a change of machine load hits both alike
                start, wall = time.process_time(), time.perf_counter()
                plain = run(model)
                plain_s.append(time.process_time() - start)
                plain_wall.append(time.perf_counter() - wall)
                counter.n = 0
                start, wall = time.process_time(), time.perf_counter()
                out = run(cached)
                cached_s.append(time.process_time() - start)
                cached_wall.append(time.perf_counter() - wall)
            counter.handle.remove()
            full_share = counter.n / inputs["steps"]
            rows.append({"model": label, "method": method, "params": params,
                         "uncached_s": _median(plain_s), "cached_s": _median(cached_s),
                         "uncached_wall_s": _median(plain_wall), "cached_wall_s": _median(cached_wall),
                         "speedup": _median(plain_s) / _median(cached_s), "full_calls_share": full_share,
                         "rel_l2": float((out - plain).norm() / plain.norm()),
                         "max_abs": float((out - plain).abs().max()), "n": repeat})
            print(f"{label} {method} {params}: {rows[-1]['speedup']:.2f}x, full {full_share:.2f}, "
                  f"rel L2 {rows[-1]['rel_l2']:.4f}", file=sys.stderr)
    return rows


def preview_cost(smallest: bool, repeat: int, work: Path) -> dict[str, Any]:
    """One preview of a 512-pixel SD1.x image (64x64 latent): TAESD's decoder (its real size, random weights)
    against latent-to-RGB."""
    import torch
    from safetensors.torch import save_file

    from tui_diffusion.families import by_id
    from tui_diffusion.pipeline.previews import Latent2RGBPreviewer, TaesdPreviewer, load_taesd_decoder

    fmt = by_id("sd1").latent_format
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ae = AutoencoderTiny()
    state = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.contiguous()
             for k, v in ae.decoder.layers.state_dict(prefix="layers.").items()}
    path = work / "vae_approx" / "taesd_decoder.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    taesd, rgb = TaesdPreviewer(load_taesd_decoder(path)), Latent2RGBPreviewer(fmt)
    taesd.share = 1.0  # every call decodes (no time budget)
    side = 16 if smallest else 64
    x = torch.randn(1, 4, side, side)
    taesd(x)
    t_taesd, t_rgb = [], []
    for _ in range(repeat):
        start = time.process_time()
        taesd(x)
        t_taesd.append(time.process_time() - start)
        start = time.process_time()
        rgb(x)
        t_rgb.append(time.process_time() - start)
    return {"latent": side, "taesd_s": _median(t_taesd), "latent2rgb_s": _median(t_rgb), "n": repeat,
            "taesd_pixels": side * 8}


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [BEGIN, "", "## Step caching (`python -m benchmarks.step_cache`)", "",
             f"Measured {results['when']} on {m['cpus']} CPUs (torch {m['torch']}, diffusers {m['diffusers']}), "
             f"{results['repeat']} alternating runs each, medians of the process's CPU time with one torch thread "
             f"(the machine was shared: load average {m['load']:.1f} at the start, so wall times were not "
             "steady; they are in the JSON). Reduced-size random-weight models of the real "
             "architectures, on the CPU: the speed-up is what the hooks save on those shapes; whether First Block "
             "Cache skips depends on how much the first block's output moves between steps, which for random "
             "weights is not what a trained model does, so read the share of full network calls beside it. "
             "\"Latent change\" is the relative L2 distance of the final latent from the uncached one.", "",
             "| model | method | uncached (CPU s) | cached (CPU s) | speed-up | full network calls | latent change "
             "(rel. L2) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["step_cache"]:
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items())
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['method']} ({params}) | | | refused: {r['skipped']} | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} ({params}) | {r['uncached_s']:.2f} s | {r['cached_s']:.2f} s "
                     f"| {r['speedup']:.2f}x | {r['full_calls_share'] * 100:.0f}% | {r['rel_l2']:.4f} |")
    p = results["preview"]
    lines += ["", f"One preview of a {p['taesd_pixels']}-pixel image ({p['latent']}x{p['latent']} latent): TAESD "
              f"decoder {p['taesd_s'] * 1000:.0f} ms, latent-to-RGB {p['latent2rgb_s'] * 1000:.2f} ms of CPU time "
              f"(medians of {p['n']}). The worker makes a preview only when it sends one (at most every 250 ms), "
              "and TAESD decodes take at most a fifth of the wall time (`TaesdPreviewer.share`), so on a CPU "
              "TAESD previews come seldom rather than slow sampling down; `--preview-method latent2rgb` keeps "
              "them free and frequent.", "", END]
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    """Replace this benchmark's section (between its markers), or add it at the end of the file."""
    from benchmarks.docs import replace_section

    replace_section(path, BEGIN, END, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--smallest", action="store_true", help="tiny models and sizes (the test suite's smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--docs", type=Path, default=None, help="rewrite this benchmark's section of this file")
    args = parser.parse_args(argv)
    import diffusers
    import torch

    torch.set_num_threads(1)  # CPU time then measures the work, not the threads' waiting
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeat": args.repeat,
                   "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                               "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
                               "load": os.getloadavg()[0]},
                   "step_cache": step_cache(args.smallest, args.repeat, work),
                   "preview": preview_cost(args.smallest, args.repeat, work)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    section = table(results)
    if args.docs:
        write_docs(args.docs, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

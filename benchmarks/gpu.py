"""The GPU table (issue 17, item 3): KSampler it/s and peak GPU memory on full-size architectures, against
diffusers' own pipelines running the same modules in the same process.

    python -m benchmarks.gpu --json gpu.json [--budget SECONDS] [--work DIR]   # on a CUDA machine
    python -m benchmarks.gpu --render gpu.json --docs docs/benchmarks.md      # anywhere: the table into the docs

Models (random weights of the published architectures, written by the project's own writers in the layouts
people download, then loaded by this program's loaders): SD1.5 at 512x512 (fp16), SDXL base at 1024x1024
(fp16), SD3.5 Large and Flux.1 dev at 1024x1024 (transformer files in bf16; the text encoders are left out and
the conditioning is random tensors of the encoders' shapes, since only the sampler is measured). Euler, 20 steps
(SD1.5/SDXL cfg 7, SD3.5 cfg 4.5, Flux cfg 1 with guidance 3.5).

Variants, each timed after a warm-up run (which is where compiling happens):
- ``eager``: KSampler as a job runs it; ``diffusers``: the diffusers pipeline's loop over the same module with
  the same embeddings (``output_type="latent"``), the reference;
- ``compile``: what ``--compile`` does (``torch.compile`` of the model in place);
- ``cudagraphs`` (SD1.5, SDXL): ``torch.compile(mode="reduce-overhead")``, CUDA graphs over the model call;
- ``lowvram`` and ``fp8`` (Flux, 4 steps): the model loaded with ``--lowvram`` (blocks streamed from the CPU)
  and with ``weight_dtype`` fp8_e4m3fn (weights kept in fp8).

Memory: ``weights`` is what the model's load allocated on the GPU; ``peak`` is the weights plus the most the
run allocated above what was allocated when it started (so models kept from earlier figures do not count).
Variants run in priority order within ``--budget`` seconds; each result is written to the JSON as soon as it
is known, so a run cut short keeps what it measured. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
#: model -> (label, size, steps, cfg); ``tiny`` runs the same code on small shapes (a check on the CPU)
MODELS = {
    "sd15": ("SD1.5", 512, 20, 7.0),
    "sdxl": ("SDXL base", 1024, 20, 7.0),
    "sd35": ("SD3.5 Large", 1024, 20, 4.5),
    "flux": ("Flux.1 dev", 1024, 20, 1.0),
}
#: the order variants run in while the budget lasts, with the seconds each is expected to need at full size
PLAN = [
    ("sd15", "eager", 40), ("sd15", "compile", 120), ("sd15", "cudagraphs", 120),
    ("sdxl", "eager", 90), ("sd35", "eager", 150), ("flux", "eager", 200),
    ("sdxl", "compile", 150), ("sdxl", "cudagraphs", 150),
    ("flux", "lowvram", 60), ("flux", "fp8", 60),
    ("sd35", "compile", 180), ("flux", "compile", 240),
]


class Bench:
    """One process's run: the files, the loaded models and the results so far."""

    def __init__(self, work: Path, out: Path, tiny: bool) -> None:
        import torch

        self.torch = torch
        self.work, self.out, self.tiny = work, out, tiny
        self.cuda = torch.cuda.is_available() and not tiny
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.loaded: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                                        "machine": self._machine(), "figures": {}, "errors": {}}

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _machine(self) -> dict[str, Any]:
        import platform

        import diffusers

        torch = self.torch
        return {"gpu": torch.cuda.get_device_name(0) if self.cuda else "none (tiny check on the CPU)",
                "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                "python": platform.python_version()}

    def save(self) -> None:
        self.out.write_text(json.dumps(self.results, indent=1))

    def record(self, model: str, variant: str, value: dict[str, Any]) -> None:
        self.results["figures"].setdefault(model, {})[variant] = value
        self.save()
        print(f"{model} {variant}: {value}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else 0

    def measure(self, fn: Callable[[], Any], steps: int, weights: int) -> dict[str, Any]:
        """it/s and peak memory of one timed run of ``fn`` (after its warm-up, done by the caller)."""
        torch = self.torch
        self.sync()
        base = self.allocated()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        self.sync()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) if self.cuda else 0
        return {"its": steps / seconds, "seconds": seconds, "weights_gib": weights / 2**30,
                "peak_gib": (weights + peak) / 2**30}

    # -- files ----------------------------------------------------------------------------------------------------
    def write(self, model: str) -> Path:
        """The model's file, written on the GPU (random init there is fast) in the layout people download."""
        import torch

        tiny = self.tiny
        dit = model in ("sd35", "flux") and self.cuda
        default = torch.get_default_dtype()
        if dit:  # built in the file's bf16: Flux in fp32 and its converted copy would take 100 GB of the GPU
            torch.set_default_dtype(torch.bfloat16)
        try:
            return self._write(model, tiny)
        finally:
            torch.set_default_dtype(default)
            if self.cuda:
                torch.cuda.empty_cache()

    def _write(self, model: str, tiny: bool) -> Path:
        import torch

        from tui_diffusion.pipeline import checkpoint_writer as w
        from tui_diffusion.pipeline import checkpoint_writer_dit as wd

        with torch.device(self.dev):
            if model == "sd15":
                path = self.work / "checkpoints" / "sd15.safetensors"
                w.write_sd1_checkpoint(path, w.TinySD1() if tiny else w.FULL_SD15, dtype=torch.float16)
            elif model == "sdxl":
                path = self.work / "checkpoints" / "sdxl.safetensors"
                w.write_sdxl_checkpoint(path, w.TinySDXL() if tiny else FULL_SDXL(w), dtype=torch.float16)
            elif model == "sd35":
                path = self.work / "diffusion_models" / "sd35.safetensors"
                wd.write_sd3_transformer(path, wd.TinySD3() if tiny else FULL_SD35(wd), dtype="bf16")
            else:
                path = self.work / "diffusion_models" / "flux.safetensors"
                wd.write_flux_transformer(path, wd.TinyFlux() if tiny else FULL_FLUX(wd), dtype="bf16")
        return path

    def forget_file(self, model: str) -> None:
        """The model's file, once no variant left in the plan needs it (the files are large)."""
        path = self.loaded.get(model, {}).pop("path", None)
        if path is not None:
            path.unlink(missing_ok=True)

    # -- loading ------------------------------------------------------------------------------------------------
    def device(self, memory: str = "normal") -> Any:
        from tui_diffusion.pipeline.device import resolve_device
        from tui_diffusion.settings import DevicePolicy

        return resolve_device(DevicePolicy("cuda" if self.cuda else "cpu", memory=memory))

    def load(self, model: str, memory: str = "normal", weight_dtype: str = "default") -> dict[str, Any]:
        """The model loaded as a job loads it, with the conditioning its sampler takes and the diffusers pipeline
        that runs the same module."""
        torch = self.torch
        if "path" not in self.loaded.setdefault(model, {}):
            start = time.perf_counter()
            self.loaded[model]["path"] = self.write(model)
            self.results.setdefault("write_s", {})[model] = time.perf_counter() - start
        path = self.loaded[model]["path"]
        device = self.device(memory)
        before = self.allocated()
        start = time.perf_counter()
        if model in ("sd15", "sdxl"):
            entry = self._load_unet_model(model, path, device)
        else:
            entry = self._load_dit(model, path, device, weight_dtype)
        self.sync()
        entry["load_s"] = time.perf_counter() - start
        entry["weights"] = self.allocated() - before
        torch.manual_seed(0)
        return entry

    def _load_unet_model(self, model: str, path: Path, device: Any) -> dict[str, Any]:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        from tui_diffusion.pipeline.models import load_checkpoint
        from tui_diffusion.pipeline.nodes import encode_text

        loaded = load_checkpoint(path, device, Path(tempfile.mkdtemp(dir=self.work)))
        cond, pooled = encode_text(loaded.clip, "a photo of a lighthouse on a cliff at dusk")
        uncond, pooled_u = encode_text(loaded.clip, "blurry")
        sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="linspace")
        unet = loaded.model.unet
        if model == "sd15":
            enc = loaded.clip.encoders[0]
            pipe = StableDiffusionPipeline(vae=loaded.vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer,
                                           unet=unet, scheduler=sched, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            ref_kwargs: dict[str, Any] = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
        else:
            pipe = StableDiffusionXLPipeline(vae=loaded.vae.vae, text_encoder=None, text_encoder_2=None,
                                             tokenizer=None, tokenizer_2=None, unet=unet, scheduler=sched)
            ref_kwargs = {"prompt_embeds": cond, "negative_prompt_embeds": uncond,
                          "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled_u}
        ref_kwargs = {k: v.to(unet.dtype) for k, v in ref_kwargs.items()}
        pipe.set_progress_bar_config(disable=True)
        return {"handle": loaded.model, "module": unet, "pipe": pipe, "ref": ref_kwargs, "latent_channels": 4,
                "positive": [[cond, {"pooled_output": pooled}]], "negative": [[uncond, {"pooled_output": pooled_u}]]}

    def _load_dit(self, model: str, path: Path, device: Any, weight_dtype: str) -> dict[str, Any]:
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

        from tui_diffusion.pipeline.models_dit import TensorReader, load_transformer, model_handle

        kind, module = load_transformer(TensorReader(path), device, weight_dtype)
        cfg = module.config
        gen = torch.Generator().manual_seed(1)
        dev = device.torch_device

        def randn(*shape: int) -> Any:
            return torch.randn(*shape, generator=gen).to(dev)

        tokens = 154 if kind == "sd3" else 256  # CLIP-L/G + T5 (SD3), T5 (Flux) as ComfyUI's encoders give them
        ctx, pooled = randn(1, tokens, cfg.joint_attention_dim), randn(1, cfg.pooled_projection_dim)
        uctx, upooled = randn(1, tokens, cfg.joint_attention_dim), randn(1, cfg.pooled_projection_dim)
        dtype = module.dtype
        if kind == "sd3":
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            pipe: Any = StableDiffusion3Pipeline(
                transformer=module, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
            ref = {"prompt_embeds": ctx.to(dtype), "negative_prompt_embeds": uctx.to(dtype),
                   "pooled_prompt_embeds": pooled.to(dtype), "negative_pooled_prompt_embeds": upooled.to(dtype)}
            extras: dict[str, Any] = {}
        else:
            sched = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
            pipe = FluxPipeline(transformer=module, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None)
            ref = {"prompt_embeds": ctx.to(dtype), "pooled_prompt_embeds": pooled.to(dtype), "guidance_scale": 3.5}
            extras = {"guidance": 3.5}
        pipe.set_progress_bar_config(disable=True)
        return {"handle": model_handle(kind, module, device, str(path)), "module": module, "pipe": pipe, "ref": ref,
                "latent_channels": 16, "positive": [[ctx, {"pooled_output": pooled, **extras}]],
                "negative": [[uctx, {"pooled_output": upooled, **extras}]]}

    # -- runs -----------------------------------------------------------------------------------------------------
    def ours(self, model: str, entry: dict[str, Any], steps: int) -> Callable[[], Any]:
        import torch

        from tui_diffusion.pipeline import ksampler as ks
        from tui_diffusion.pipeline.context import NodeContext

        label, size, _, cfg = MODELS[model]
        size = 64 if self.tiny else size
        latent = {"samples": torch.zeros(1, entry["latent_channels"], size // 8, size // 8)}
        ctx = NodeContext(None, "3", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]
        return lambda: ks.ksampler(ctx, entry["handle"], 1, steps, cfg, "euler", "simple" if model in ("sd35", "flux")
                                   else "normal", entry["positive"], entry["negative"], latent)

    def reference(self, model: str, entry: dict[str, Any], steps: int) -> Callable[[], Any]:
        import torch

        _, size, _, cfg = MODELS[model]
        size = 64 if self.tiny else size
        kwargs = dict(entry["ref"])
        if model != "flux":
            kwargs["guidance_scale"] = cfg
        gen = torch.Generator(self.dev)
        return lambda: entry["pipe"](height=size, width=size, num_inference_steps=steps, output_type="latent",
                                     generator=gen.manual_seed(0), **kwargs)

    def timed(self, fn: Callable[[], Any], steps: int, weights: int) -> dict[str, Any]:
        fn()  # warm-up: kernels, the allocator, compiling
        return self.measure(fn, steps, weights)

    def run_variant(self, model: str, variant: str) -> None:
        torch = self.torch
        steps = 2 if self.tiny else MODELS[model][2]
        if variant == "eager":
            entry = self.loaded.setdefault(model, {}).get("entry") or self.load(model)
            self.loaded[model]["entry"] = entry
            ours = self.timed(self.ours(model, entry, steps), steps, entry["weights"])
            ref = self.timed(self.reference(model, entry, steps), steps, entry["weights"])
            self.record(model, "eager", {**ours, "load_s": entry["load_s"]})
            self.record(model, "diffusers", ref)
            return
        if variant in ("lowvram", "fp8"):
            self.drop_all()
            steps = 2 if self.tiny else 4
            entry = self.load(model, memory="lowvram") if variant == "lowvram" else self.load(model,
                                                                                            weight_dtype="fp8_e4m3fn")
            value = self.timed(self.ours(model, entry, steps), steps, entry["weights"])
            self.record(model, variant, {**value, "load_s": entry["load_s"], "steps": steps})
            del entry
            self.drop_all()
            return
        entry = self.loaded.setdefault(model, {}).get("entry") or self.load(model)
        self.loaded[model]["entry"] = entry
        module = entry["module"]
        torch._dynamo.reset()
        if variant == "compile":
            module.compile()  # what --compile does after a load
        else:
            module.compile(mode="reduce-overhead")
        fn = self.ours(model, entry, steps)
        start = time.perf_counter()
        fn()  # compiles
        self.sync()
        compile_s = time.perf_counter() - start
        value = self.measure(fn, steps, entry["weights"])
        module._compiled_call_impl = None  # back to eager for the next variant
        torch._dynamo.reset()
        self.record(model, variant, {**value, "first_run_s": compile_s})

    def drop_all(self) -> None:
        import gc

        for model in self.loaded.values():
            model.pop("entry", None)
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def drop(self, model: str) -> None:
        import gc

        self.loaded.get(model, {}).pop("entry", None)
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def FULL_SDXL(w: Any) -> Any:  # noqa: N802 - a size table, named like FULL_SD15
    """SDXL base's published shapes."""
    return w.TinySDXL(unet_channels=(320, 640, 1280), unet_attention=(False, True, True), layers_per_block=2,
                      transformer_depth=(1, 2, 10), clip_l_width=768, clip_l_layers=12, clip_g_width=1280,
                      clip_g_layers=32, time_embed_dim=256, vae_channels=(128, 256, 512, 512), vae_layers=2)


def FULL_SD35(wd: Any) -> Any:  # noqa: N802
    """SD3.5 Large's published shapes (38 blocks of 64 x 38 channels, qk norm, position table of 192)."""
    return wd.TinySD3(depth=38, pos_embed_max_size=192, qk_norm=True, dual_attention_layers=(),
                      text=wd.TinyText(clip_l_width=768, clip_g_width=1280, t5_width=4096))


def FULL_FLUX(wd: Any) -> Any:  # noqa: N802
    """Flux.1 dev's published shapes (19 double and 38 single blocks of 24 heads, guidance embedded)."""
    return wd.TinyFlux(heads=24, layers=19, single_layers=38, guidance=True,
                       text=wd.TinyText(clip_l_width=768, t5_width=4096))


def _run_one(bench: Bench, model: str, variant: str, expected: float, left: float, previous: str | None) -> None:
    if variant != "eager" and "eager" not in bench.results["figures"].get(model, {}):
        return  # its eager figure did not run: no baseline to compare with
    if not bench.tiny and left < expected:
        bench.results["errors"][f"{model} {variant}"] = f"skipped: {left:.0f} s of the budget left"
        bench.save()
        return
    if previous is not None and previous != model and variant == "eager":
        bench.drop(previous)  # its compile variants come later in the plan, loaded again then if needed
    try:
        bench.run_variant(model, variant)
    except Exception as exc:  # record and go on: one failure must not cost the other figures
        bench.results["errors"][f"{model} {variant}"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
        bench.save()


def run(work: Path, out: Path, budget: float, tiny: bool, only: set[str] | None,
        variants: set[str] | None = None) -> dict[str, Any]:
    bench = Bench(work, out, tiny)
    start = time.perf_counter()
    plan = [(m, v, e) for m, v, e in PLAN if (not only or m in only) and (not variants or v in variants)]
    last_use = {model: i for i, (model, _, _) in enumerate(plan)}
    last_model = None
    for index, (model, variant, expected) in enumerate(plan):
        try:
            _run_one(bench, model, variant, expected, budget - (time.perf_counter() - start),
                     previous=last_model)
        finally:
            last_model = model
            if last_use[model] == index:
                bench.drop(model)
                bench.forget_file(model)
    bench.results["total_s"] = time.perf_counter() - start
    bench.save()
    return bench.results


# -- the docs ---------------------------------------------------------------------------------------------------
def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [BEGIN, "", "## GPU (`python -m benchmarks.gpu`)", "",
             f"Measured {results['date']} on {m['gpu']} (torch {m['torch']}, CUDA {m['cuda']}, diffusers "
             f"{m['diffusers']}) by `benchmarks/gpu.py`, whose docstring says how. Random weights of the published "
             "architectures in the layouts people download, loaded by this program's loaders; euler, 20 steps; "
             "`diffusers` is diffusers' own pipeline loop over the same module with the same embeddings. "
             "Peak memory is the model's weights plus the most a run allocated above them.", "",
             "| model | size | variant | it/s | vs diffusers | vs eager | peak GPU memory | note |",
             "|---|---|---|---|---|---|---|---|"]
    for model, (label, size, _, _) in MODELS.items():
        figs = results["figures"].get(model, {})
        ref = figs.get("diffusers", {}).get("its")
        eager = figs.get("eager", {}).get("its")
        for variant in ("eager", "diffusers", "compile", "cudagraphs", "lowvram", "fp8"):
            fig = figs.get(variant)
            if fig is None:
                continue
            note = []
            if "load_s" in fig:
                note.append(f"load {fig['load_s']:.1f} s")
            if "first_run_s" in fig:
                note.append(f"first run (compiling) {fig['first_run_s']:.0f} s")
            if "steps" in fig:
                note.append(f"{fig['steps']} steps")
            vs_ref = f"{fig['its'] / ref:.2f}x" if ref and variant != "diffusers" else ""
            vs_eager = f"{fig['its'] / eager:.2f}x" if eager and variant not in ("eager", "diffusers") else ""
            lines.append(f"| {label} | {size}x{size} | {variant} | {fig['its']:.2f} | {vs_ref} | {vs_eager} | "
                         f"{fig['peak_gib']:.2f} GiB | {', '.join(note)} |")
    if results.get("errors"):
        lines += ["", "Not measured in that run:", ""]
        lines += [f"- {what}: {why.splitlines()[0][:300]}" for what, why in results["errors"].items()]
    lines += ["", END]
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    """Replace this benchmark's section (between its markers), or add it at the end of the file."""
    from benchmarks.docs import replace_section

    replace_section(path, BEGIN, END, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("gpu.json"), help="where the results go")
    parser.add_argument("--work", type=Path, default=None, help="folder for the model files (deleted after)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; variants that would not fit are left")
    parser.add_argument("--only", default="", help="comma-separated models (sd15,sdxl,sd35,flux)")
    parser.add_argument("--variants", default="", help="comma-separated (eager,compile,cudagraphs,lowvram,fp8)")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks the code, not the GPU")
    parser.add_argument("--render", type=Path, default=None, help="a results JSON to turn into the docs' table")
    parser.add_argument("--docs", type=Path, default=None, help="with --render: rewrite this file's GPU section")
    args = parser.parse_args(argv)
    if args.render:
        section = render(json.loads(args.render.read_text()))
        if args.docs:
            write_docs(args.docs, section)
        print(section)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="td-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, args.json, args.budget, args.tiny, {m for m in args.only.split(",") if m} or None,
            {v for v in args.variants.split(",") if v} or None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

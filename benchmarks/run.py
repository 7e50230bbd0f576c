"""The benchmark suite: each figure a ratio against a reference measured in the same run.

    python -m benchmarks.run [--smallest] [--repeat N] [--out benchmarks/results]

Writes results.md and results.json (machine, versions, each figure's median and spread). Asserts nothing.
``--smallest`` runs every figure at its smallest size (tiny models), as the test suite's smoke test does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _txt2img(ckpt: str, size: int, steps: int, seed: int = 1, prompt: str | None = None) -> dict[str, Any]:
    data = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    data["4"]["inputs"]["ckpt_name"] = ckpt
    data["5"]["inputs"].update(width=size, height=size)
    data["3"]["inputs"].update(steps=steps, seed=seed, cfg=7.0)
    if prompt is not None:
        data["6"]["inputs"]["text"] = prompt
    return data


# -- figure 1: sampling speed against the diffusers pipeline loop ---------------------------------------------
def sampling_speed(models: Path, ckpt: str, size: int, steps: int, repeat: int,
                   compiled: bool = False) -> dict[str, Any]:
    """KSampler against diffusers' pipeline loop; ``compiled``: ours with ``--compile`` (a second copy of
    the models, compiled at the warm-up; the reference stays eager)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from tui_diffusion.pipeline import ksampler as ks
    from tui_diffusion.pipeline.context import NodeContext
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.pipeline.nodes import encode_text
    from tui_diffusion.pipeline.sampling import noise_for
    from tui_diffusion.settings import DevicePolicy

    device = resolve_device(DevicePolicy("cpu"))
    loaded = load_checkpoint(models / "checkpoints" / ckpt, device, Path(tempfile.mkdtemp()))
    cond, _ = encode_text(loaded.clip, "a photo of a lighthouse")
    uncond, _ = encode_text(loaded.clip, "blurry")
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    ctx = NodeContext(None, "3", {}, report=lambda *a: None, interrupted=lambda: False)  # type: ignore[arg-type]

    model = loaded.model
    if compiled:
        model = load_checkpoint(models / "checkpoints" / ckpt, resolve_device(DevicePolicy("cpu", compile=True)),
                                Path(tempfile.mkdtemp())).model

    def ours() -> None:
        ks.ksampler(ctx, model, 1, steps, 7.0, "euler", "normal", [[cond, {}]], [[uncond, {}]], latent)

    enc = loaded.clip.encoders[0]
    sched = EulerDiscreteScheduler.from_config(loaded.model.scheduler_config, timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=loaded.vae.vae, text_encoder=enc.model, tokenizer=enc.tokenizer,
                                   unet=loaded.model.unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = noise_for(1, (1, 4, size // 8, size // 8))

    def reference() -> None:
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size, num_inference_steps=steps,
             guidance_scale=7.0, latents=noise.clone(), output_type="latent")

    ours()
    reference()  # warm-up: allocator, kernels
    a, b = [], []
    for _ in range(repeat):  # alternate, so drift hits both alike
        a.append(_timed(ours))
        b.append(_timed(reference))
    return {"ours_s": _stats(a), "reference_s": _stats(b), "ratio": statistics.median(a) / statistics.median(b)}


# -- figures 2 and 3: the engine through the worker ---------------------------------------------------------------
def _client(models: Path, out: Path) -> Any:
    from tui_diffusion.client import WorkerClient
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    config = WorkerConfig(models_dir=models, output_dir=out, temp_dir=out / "tmp", device=DevicePolicy("cpu"),
                          db_path=out / "history.sqlite3")
    client = WorkerClient(config)
    client.start()
    client.wait_ready(timeout=120)
    return client


def _through(client: Any, workflow: dict[str, Any]) -> tuple[float, Any]:
    from tui_diffusion import messages as m

    start = time.perf_counter()
    job = client.submit(workflow)
    while True:
        event = client.next_event(timeout=60)
        if isinstance(event, (m.JobFinished, m.JobFailed)) and event.job_id == job:
            return time.perf_counter() - start, event


def engine_overhead(models: Path, ckpt: str, repeat: int, out: Path) -> dict[str, Any]:
    """A seed change through the worker (sampler, decode, save) against the same three nodes called directly."""
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState, NodeContext
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.pipeline.registry import implementations
    from tui_diffusion.settings import DevicePolicy

    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(1), ModelPaths(models), out / "direct",
                         out / "direct-tmp", out / "cfg")
    ex = Executor(engine)
    warm = _txt2img(ckpt, 64, 4, seed=0)
    ex.run(warm, Hooks(), lambda: False)
    from tui_diffusion.graph.workflow import Workflow
    from tui_diffusion.pipeline.executor import execution_order

    wf = Workflow.from_data(warm)
    keys = ex.cache_keys(wf, execution_order(wf))
    model = ex.cache[keys["4"]].outputs
    pos, neg, latent = (ex.cache[keys[n]].outputs[0] for n in ("6", "7", "5"))
    fns = implementations()

    def nodes(seed: int) -> None:
        ctx = NodeContext(engine, "3", _txt2img(ckpt, 64, 4, seed=seed), report=lambda *a: None,
                          interrupted=lambda: False)
        sampled = fns["KSampler"](ctx, model=model[0], seed=seed, steps=4, cfg=7.0, sampler_name="euler",
                                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
        ctx.node_id = "8"
        image = fns["VAEDecode"](ctx, samples=sampled.outputs[0], vae=model[2])
        ctx.node_id = "9"
        fns["SaveImage"](ctx, images=image.outputs[0], filename_prefix="ComfyUI")

    # the two alternate, job by job, so a change in the machine's load reaches both alike
    via_worker, direct = [], []
    client = _client(models, out / "worker")
    try:
        _through(client, _txt2img(ckpt, 64, 4, seed=0))
        for seed in range(1, repeat + 1):
            via_worker.append(_through(client, _txt2img(ckpt, 64, 4, seed=seed))[0])
            direct.append(_timed(lambda seed=seed: nodes(seed + 100_000)))
    finally:
        client.close()
    return {"worker_s": _stats(via_worker), "direct_s": _stats(direct),
            "ratio": statistics.median(via_worker) / statistics.median(direct)}


def reruns(models: Path, ckpt: str, repeat: int, out: Path) -> dict[str, Any]:
    client = _client(models, out / "reruns")
    try:
        base = _txt2img(ckpt, 64, 4, seed=7)
        _through(client, base)
        unchanged, executed = [], set()
        for _ in range(repeat):
            seconds, event = _through(client, base)
            unchanged.append(seconds)
            executed.update(event.executed)
        _, seed_event = _through(client, _txt2img(ckpt, 64, 4, seed=8))
        _, prompt_event = _through(client, _txt2img(ckpt, 64, 4, seed=8, prompt="another prompt"))
    finally:
        client.close()
    return {"unchanged_s": _stats(unchanged), "unchanged_executed": sorted(executed),
            "seed_changed_executed": seed_event.executed, "prompt_changed_executed": prompt_event.executed}


def load_floor(path: Path) -> None:
    """The floor of a load: every tensor of the file read with safetensors and cast to the compute dtype."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}
    del tensors


def model_load(models: Path, ckpt: str, repeat: int) -> dict[str, Any]:
    """Checkpoint file to ready models: our loader against its floor (reading the file with safetensors and
    casting every tensor to fp32) and against diffusers' from_single_file with a local config; the three
    alternate, and which goes first rotates. Also our loader's phases (medians)."""
    import gc

    from diffusers import StableDiffusionPipeline

    from tui_diffusion.families import detect
    from tui_diffusion.modelfiles import single_file
    from tui_diffusion.modelfiles.configs import write_config_folder
    from tui_diffusion.modelfiles.header import read_header
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models import ModelCache, load_checkpoint
    from tui_diffusion.settings import DevicePolicy

    path = models / "checkpoints" / ckpt
    device = resolve_device(DevicePolicy("cpu"))
    cache = Path(tempfile.mkdtemp())
    header = read_header(path)
    folder = write_config_folder(detect(header).configs(header, str(path), "epsilon"), cache)
    phases: list[dict[str, float]] = []

    def ours() -> None:
        single_file.SHARED.clear()  # each load builds every part (no reuse of the previous load's)
        load_checkpoint(path, device, cache)
        phases.append(dict(single_file.last_phases.seconds))
        gc.collect()

    def floor() -> None:
        load_floor(path)
        gc.collect()

    def reference() -> None:
        import torch

        StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                 torch_dtype=torch.float32, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        gc.collect()

    ours()  # first calls import and set up what every later load reuses: not part of a load
    floor()
    reference()
    phases.clear()
    times: dict[str, list[float]] = {"ours": [], "floor": [], "reference": []}
    sides = [("ours", ours), ("floor", floor), ("reference", reference)]
    for i in range(repeat):  # alternating, and which goes first rotates
        for name, fn in sides[i % 3:] + sides[:i % 3]:
            times[name].append(_timed(fn))
    models_cache = ModelCache(1)
    models_cache.get("k", lambda: load_checkpoint(path, device, cache))
    reload = _timed(lambda: models_cache.get("k", lambda: load_checkpoint(path, device, cache)))
    a, f, b = (statistics.median(times[k]) for k in ("ours", "floor", "reference"))
    return {"ours_s": _stats(times["ours"]), "reference_s": _stats(times["reference"]), "ratio": a / b,
            "floor_s": _stats(times["floor"]), "floor_ratio": a / f,
            "floor_ratios": [x / y for x, y in zip(times["ours"], times["floor"], strict=True)],
            "phases_s": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]} if phases else {},
            "reload_loaded_s": reload}


def preview_cost(models: Path, ckpt: str, repeat: int) -> dict[str, Any]:
    """Latent-to-RGB preview plus its half-block render, against one sampling step (128x128)."""
    import torch

    from tui_diffusion.images import halfblock_ansi, open_image
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.ksampler import latent_preview
    from tui_diffusion.pipeline.models import load_checkpoint
    from tui_diffusion.pipeline.worker import _png
    from tui_diffusion.settings import DevicePolicy

    loaded = load_checkpoint(models / "checkpoints" / ckpt, resolve_device(DevicePolicy("cpu")),
                             Path(tempfile.mkdtemp()))
    latent = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, loaded.model.unet.config.cross_attention_dim)

    def step() -> None:
        with torch.inference_mode():
            loaded.model.unet(latent, torch.tensor(500.0), encoder_hidden_states=context)

    def preview() -> None:
        png = _png(latent_preview(latent[:1], loaded.model.family.latent_format))
        halfblock_ansi(open_image(png), 40, 20)

    step()
    preview()
    a = [_timed(preview) for _ in range(repeat * 5)]
    b = [_timed(step) for _ in range(repeat)]
    return {"preview_s": _stats(a), "step_s": _stats(b), "ratio": statistics.median(a) / statistics.median(b)}


def queue_throughput(models: Path, ckpt: str, jobs: int, out: Path) -> dict[str, Any]:
    """``jobs`` tiny jobs through the worker's queue (submitted at once) against the same jobs back to back in
    one process; also the worker's memory before and after, which must stay flat."""
    import psutil

    from tui_diffusion import messages as m
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy

    workflows = [_txt2img(ckpt, 64, 2, seed=s) for s in range(jobs)]
    client = _client(models, out / "throughput")
    try:
        _through(client, _txt2img(ckpt, 64, 2, seed=10**6))
        worker = psutil.Process(client.process.pid)
        rss_before = worker.memory_info().rss
        start = time.perf_counter()
        ids = {client.submit(w) for w in workflows}
        done = 0
        while done < len(ids):
            event = client.next_event(timeout=120)
            done += isinstance(event, (m.JobFinished, m.JobFailed)) and event.job_id in ids
        queued = time.perf_counter() - start
        rss_after = worker.memory_info().rss
    finally:
        client.close()
    engine = EngineState(resolve_device(DevicePolicy("cpu")), ModelCache(1), ModelPaths(models), out / "tp-direct",
                         out / "tp-tmp", out / "cfg")
    ex = Executor(engine)
    ex.run(_txt2img(ckpt, 64, 2, seed=10**6), Hooks(), lambda: False)
    start = time.perf_counter()
    for w in workflows:
        ex.run(w, Hooks(), lambda: False)
    direct = time.perf_counter() - start
    return {"jobs": jobs, "queued_s": queued, "direct_s": direct, "ratio": queued / direct,
            "worker_rss_before_mb": rss_before / 2**20, "worker_rss_after_mb": rss_after / 2**20}


def pool_throughput(models: Path, ckpt: str, jobs: int, out: Path) -> dict[str, Any]:
    """``jobs`` tiny jobs through a pool of 2 CPU workers (each on half the cores) against 1 worker with all of
    them: jobs per second, and which workers ran them."""
    from tui_diffusion import messages as m
    from tui_diffusion.backends.pool import local_pool
    from tui_diffusion.settings import DevicePolicy, WorkerConfig

    rates: dict[int, float] = {}
    used: dict[int, int] = {}
    for workers in (1, 2):
        config = WorkerConfig(models_dir=models, output_dir=out / f"pool{workers}", temp_dir=out / "pool-tmp",
                              device=DevicePolicy("cpu"), record_history=False)
        pool = local_pool(config, workers=workers)
        try:
            pool.start()
            pool.wait_ready(180)
            warm = {pool.submit(_txt2img(ckpt, 64, 8, seed=10**6 + i)) for i in range(workers)}
            placed: dict[str, str] = {}
            while warm:
                event = pool.next_event(120)
                if isinstance(event, m.JobEnd):
                    warm.discard(event.job_id)
            start = time.perf_counter()
            ids = {pool.submit(_txt2img(ckpt, 64, 8, seed=s)) for s in range(jobs)}
            done = 0
            while done < len(ids):
                event = pool.next_event(120)
                if isinstance(event, m.JobPlaced):
                    placed[event.job_id] = event.worker
                done += isinstance(event, m.JobEnd) and event.job_id in ids
            rates[workers] = jobs / (time.perf_counter() - start)
            used[workers] = len(set(placed.values()))
        finally:
            pool.close()
    return {"jobs": jobs, "jobs_per_s_1": rates[1], "jobs_per_s_2": rates[2], "ratio": rates[2] / rates[1],
            "workers_used_2": used[2]}


def gpu_speed(models: Path, ckpt: str, steps: int = 20) -> dict[str, Any] | None:
    """On a CUDA GPU: KSampler it/s at 512x512 in fp16 on the full-size SD1.5 file, without and with
    ``--compile`` (the first compiled job is the compile; the second is timed). None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from tui_diffusion.paths import ModelPaths
    from tui_diffusion.pipeline.context import EngineState
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.executor import Executor, Hooks
    from tui_diffusion.pipeline.models import ModelCache
    from tui_diffusion.settings import DevicePolicy

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "steps": steps}
    for compiled in (False, True):
        device = resolve_device(DevicePolicy("cuda", compile=compiled))
        out = Path(tempfile.mkdtemp(prefix="td-gpu-"))
        ex = Executor(EngineState(device, ModelCache(1), ModelPaths(models), out, out / "tmp", out / "cfg"))
        ex.run(_txt2img(ckpt, 512, steps, seed=0), Hooks(), lambda: False)  # load (and compile)
        report = ex.run(_txt2img(ckpt, 512, steps, seed=1), Hooks(), lambda: False)
        result["compiled_its" if compiled else "eager_its"] = steps / report.timings["3"]
        del ex
        torch.cuda.empty_cache()
    result["compile_speedup"] = result["compiled_its"] / result["eager_its"]
    return result


def peak_memory(models: Path, ckpt: str, size: int, out: Path) -> dict[str, Any]:
    """The worker's peak resident memory for one job, against the bytes of the model's weights in fp32."""
    import threading

    import psutil
    from safetensors import safe_open

    with safe_open(str(models / "checkpoints" / ckpt), framework="numpy") as f:
        weights = 0
        for key in f.keys():
            if key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")):
                shape = f.get_slice(key).get_shape()
                count = 1
                for d in shape:
                    count *= d
                weights += count * 4  # run in fp32 on the CPU
    client = _client(models, out / "memory")
    peak = peak_anon = 0
    stop = threading.Event()

    def anon_rss(pid: int) -> int:
        """Resident anonymous memory: RSS without the file's own memory-mapped pages (Linux)."""
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    try:
        worker = psutil.Process(client.process.pid)
        idle, idle_anon = worker.memory_info().rss, anon_rss(worker.pid)

        def watch() -> None:
            nonlocal peak, peak_anon
            while not stop.is_set():
                peak = max(peak, worker.memory_info().rss)
                peak_anon = max(peak_anon, anon_rss(worker.pid))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _through(client, _txt2img(ckpt, size, 2, seed=3))
        stop.set()
        watcher.join()
    finally:
        client.close()
    return {"peak_rss_mb": peak / 2**20, "idle_rss_mb": idle / 2**20, "weights_mb": weights / 2**20,
            "ratio": (peak - idle) / weights, "peak_anon_mb": peak_anon / 2**20, "idle_anon_mb": idle_anon / 2**20,
            "anon_ratio": (peak_anon - idle_anon) / weights if peak_anon else None}


def startup(repeat: int) -> dict[str, Any]:
    from benchmarks.startup import first_frames, summary, worker_ready_seconds

    frames, bare = first_frames(ROOT / "workflows" / "txt2img.json", repeat)
    ready = [worker_ready_seconds() for _ in range(repeat)]
    return {"tui_first_frame_s": summary(frames), "bare_textual_first_frame_s": summary(bare),
            "worker_ready_s": summary(ready)}


# -- driver ---------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import diffusers
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "device": "cpu"}


def prepare_models(root: Path, smallest: bool) -> tuple[str, str]:
    import torch

    from tui_diffusion.pipeline.checkpoint_writer import FULL_SD15, write_sd1_checkpoint

    tiny = root / "checkpoints" / "tiny.safetensors"
    if not tiny.exists():
        write_sd1_checkpoint(tiny)
    if smallest:
        return "tiny.safetensors", "tiny.safetensors"
    full = root / "checkpoints" / "full-sd15-fp16.safetensors"
    if not full.exists():
        write_sd1_checkpoint(full, FULL_SD15, dtype=torch.float16)
    return "tiny.safetensors", "full-sd15-fp16.safetensors"


def table(results: dict[str, Any]) -> str:
    rows = ["| figure | ours | reference | ratio | target |", "|---|---|---|---|---|"]
    for key, fig in results["figures"].items():
        if "ratio" in fig and key.startswith(("1_", "2_", "5_")):
            a, b = [fig[k] for k in fig if k.endswith("_s") and isinstance(fig[k], dict)][:2]
            rows.append(f"| {key} | {a['median']:.4f} s ({a['min']:.4f}-{a['max']:.4f}) | "
                        f"{b['median']:.4f} s ({b['min']:.4f}-{b['max']:.4f}) | {fig['ratio']:.3f}x | "
                        f"{fig.get('target', '')} |")
    load = results["figures"].get("5_model_load")
    if load and "floor_s" in load:
        f = load["floor_s"]
        rows.append(f"| 5_model_load against its floor (safetensors read + cast to fp32) | "
                    f"{load['ours_s']['median']:.3f} s | {f['median']:.3f} s ({f['min']:.3f}-{f['max']:.3f}) | "
                    f"{load['floor_ratio']:.3f}x | <= 1.2x |")
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in load.get("phases_s", {}).items())
        rows.append(f"| 5_model_load: our phases (medians) | {phases} | | | |")
    first = results["figures"].get("11_first_image")
    if first:
        for fig in (first, results["figures"].get("11_first_image_cold")):
            if fig:
                label = "cold page cache" if fig["cold"] else "warm page cache"
                parts = ", ".join(f"{k} {v:.2f} s" for k, v in fig["phases_s"].items())
                rows.append(f"| 11_first_image ({label}): `run` start to saved PNG, {fig['size']}px, "
                            f"{fig['steps']} steps | {fig['total_to_png_s']:.2f} s | {parts} | | |")
    if load:
        rows.append(f"| 5_model_load: reload of a loaded checkpoint | {load['reload_loaded_s'] * 1000:.2f} ms "
                    "| | | free |")
    pc = results["figures"].get("6_preview_cost")
    if pc:
        rows.append(f"| 6_preview_cost | {pc['preview_s']['median'] * 1000:.2f} ms | "
                    f"{pc['step_s']['median'] * 1000:.1f} ms (one step) | {pc['ratio']:.4f}x | < 0.02x |")
    pm = results["figures"].get("7_peak_memory")
    if pm:
        rows.append(f"| 7_peak_memory: worker peak RSS over idle | {pm['peak_rss_mb'] - pm['idle_rss_mb']:.0f} MB | "
                    f"{pm['weights_mb']:.0f} MB of fp32 weights | {pm['ratio']:.2f}x | close to 1x |")
        if pm.get("anon_ratio"):
            rows.append(f"| 7_peak_memory: of it anonymous (not the file's mapped pages) | "
                        f"{pm['peak_anon_mb'] - pm['idle_anon_mb']:.0f} MB | {pm['weights_mb']:.0f} MB | "
                        f"{pm['anon_ratio']:.2f}x | close to 1x |")
    tp = results["figures"].get("8_queue_throughput")
    if tp:
        rows.append(f"| 8_queue_throughput: {tp['jobs']} jobs | {tp['queued_s']:.2f} s | {tp['direct_s']:.2f} s "
                    f"| {tp['ratio']:.3f}x | close to 1x |")
        rows.append(f"| 8_queue_throughput: worker memory | {tp['worker_rss_before_mb']:.0f} MB before, "
                    f"{tp['worker_rss_after_mb']:.0f} MB after | | | flat |")
    pt = results["figures"].get("9_workers")
    if pt:
        rows.append(f"| 9_workers: {pt['jobs']} tiny jobs, 2 CPU workers | {pt['jobs_per_s_2']:.1f} jobs/s "
                    f"({pt['workers_used_2']} workers used) | {pt['jobs_per_s_1']:.1f} jobs/s (1 worker) | "
                    f"{pt['ratio']:.2f}x | close to 2x on 2 cores |")
    gpu = results["figures"].get("10_gpu")
    if gpu:
        rows.append(f"| 10_gpu: SD1.5 512x512 fp16 KSampler ({gpu['device']}) | {gpu['compiled_its']:.1f} it/s "
                    f"with --compile | {gpu['eager_its']:.1f} it/s | {gpu['compile_speedup']:.2f}x | |")
    rr = results["figures"].get("3_reruns")
    if rr:
        u = rr["unchanged_s"]
        rows.append(f"| 3_reruns: nothing changed, submit to done | {u['median'] * 1000:.1f} ms "
                    f"({u['min'] * 1000:.1f}-{u['max'] * 1000:.1f}) | | | "
                    f"< 20 ms; executed {rr['unchanged_executed']} |")
        rows.append(f"| 3_reruns: seed changed | executed {rr['seed_changed_executed']} | | | 3, 8, 9 |")
        rows.append(f"| 3_reruns: prompt changed | executed {rr['prompt_changed_executed']} | | | 6, 3, 8, 9 |")
    st = results["figures"].get("4_startup")
    if st:
        f, w = st["tui_first_frame_s"], st["worker_ready_s"]
        rows.append(f"| 4_startup: TUI first frame | {f['median_s']:.3f} s ({f['min_s']:.3f}-{f['max_s']:.3f}) | | "
                    "| < 0.5 s |")
        if "bare_textual_first_frame_s" in st:
            b = st["bare_textual_first_frame_s"]
            rows.append(f"| 4_startup: bare Textual app's first frame (the floor) | {b['median_s']:.3f} s "
                        f"({b['min_s']:.3f}-{b['max_s']:.3f}) | | | first frame / this: "
                        f"{f['median_s'] / b['median_s']:.2f}x |")
        rows.append(f"| 4_startup: worker ready | {w['median_s']:.3f} s ({w['min_s']:.3f}-{w['max_s']:.3f}) | | "
                    "| < 5 s |")
    m = results["machine"]
    head = (f"Machine: {m['platform']}, {m['cpus']} CPUs ({m['threads']} torch threads), Python {m['python']}, "
            f"torch {m['torch']}, diffusers {m['diffusers']}, device {m['device']}.")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smallest", action="store_true", help="every figure at its smallest size (a smoke run)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / ".models",
                        help="where the benchmark's random-weight checkpoints are written (kept between runs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    # start-up first, on a quiet machine: the later figures leave gigabytes to be paged out
    figures["4_startup"] = startup(max(1, min(args.repeat, 5)))
    tiny, full = prepare_models(args.models, args.smallest)
    work = Path(tempfile.mkdtemp(prefix="tui-diffusion-bench-"))
    sizes = [64] if args.smallest else [64, 128]
    for size in sizes:
        fig = sampling_speed(args.models, full, size, steps=2 if args.smallest else 4, repeat=args.repeat)
        fig["target"] = "<= 0.88x (never above 1.01x)"
        figures[f"1_sampling_{size}px"] = fig
        print(f"1_sampling_{size}px: {fig['ratio']:.3f}x", file=sys.stderr)
        if not args.smallest:  # compiling the full UNet takes a minute or more: not in the smoke run
            fig = sampling_speed(args.models, full, size, steps=4, repeat=args.repeat, compiled=True)
            fig["target"] = "opt-in --compile"
            figures[f"1_sampling_{size}px_compiled"] = fig
            print(f"1_sampling_{size}px_compiled: {fig['ratio']:.3f}x", file=sys.stderr)
    figures["2_engine_overhead"] = {**engine_overhead(args.models, tiny, 8 * args.repeat, work), "target": "<= 1.03x"}
    print(f"2_engine_overhead: {figures['2_engine_overhead']['ratio']:.3f}x", file=sys.stderr)
    figures["3_reruns"] = reruns(args.models, tiny, args.repeat, work)
    figures["5_model_load"] = {**model_load(args.models, full, args.repeat),
                               "target": "<= 1.0x; <= 1.2x the floor; reload free"}
    print(f"5_model_load: {figures['5_model_load']['floor_ratio']:.3f}x the floor", file=sys.stderr)
    if not args.smallest:  # fresh processes on the full-size file (the test suite runs the script on a tiny one)
        from benchmarks.first_image import first_image

        figures["11_first_image"] = first_image(args.models, full, 128, 4, repeat=min(3, args.repeat))
        figures["11_first_image_cold"] = first_image(args.models, full, 128, 4, repeat=1, cold=True)
    figures["6_preview_cost"] = {**preview_cost(args.models, full, args.repeat), "target": "< 0.02x"}
    figures["7_peak_memory"] = {**peak_memory(args.models, full, 64 if args.smallest else 128, work),
                                "target": "close to the weights"}
    figures["8_queue_throughput"] = {**queue_throughput(args.models, tiny, 20 if args.smallest else 200, work),
                                     "target": "close to 1x; memory flat"}
    figures["9_workers"] = pool_throughput(args.models, tiny, 8 if args.smallest else 40, work)
    print(f"9_workers: {figures['9_workers']['ratio']:.2f}x", file=sys.stderr)
    gpu = gpu_speed(args.models, full)
    if gpu:
        figures["10_gpu"] = gpu
    results = {"machine": machine(), "figures": figures, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU benchmark (``benchmarks/gpu.py``) runs its code paths on small shapes on the CPU: the writers, this
program's loaders, KSampler, diffusers' pipelines over the same modules, ``--lowvram`` and fp8 loads, and the table
it writes into the docs. On a GPU the same code measures the published sizes; here nothing is timed or compared."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu


def test_every_model_and_variant_runs_and_the_table_names_them(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    results = gpu.run(tmp_path / "work", out, budget=0, tiny=True, only={"sd15", "flux"},
                      variants={"eager", "lowvram", "fp8"})
    assert results["errors"] == {}
    figures = results["figures"]
    assert set(figures) == {"sd15", "flux"}
    assert set(figures["sd15"]) == {"eager", "diffusers"}
    assert set(figures["flux"]) == {"eager", "diffusers", "lowvram", "fp8"}
    for model in figures.values():
        for fig in model.values():
            assert fig["its"] > 0 and fig["seconds"] > 0
    assert json.loads(out.read_text()) == results  # written as it goes: a run cut short keeps its figures
    assert not list((tmp_path / "work").rglob("*.safetensors"))  # each file removed after its last use

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nbefore\n\n<!-- gpu:begin -->\nold table\n<!-- gpu:end -->\n\nafter\n")
    gpu.write_docs(docs, gpu.render(results))
    text = docs.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nbefore") and text.rstrip().endswith("after")
    rows = [line for line in text.splitlines() if line.startswith("| SD1.5") or line.startswith("| Flux")]
    assert [r.split("|")[3].strip() for r in rows] == ["eager", "diffusers", "eager", "diffusers", "lowvram", "fp8"]


def test_a_variant_that_fails_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    def broken(self, model: str, entry: dict, steps: int):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu.Bench, "reference", broken)
    results = gpu.run(tmp_path / "work", tmp_path / "gpu.json", budget=0, tiny=True, only={"sd35"},
                      variants={"eager"})
    assert results["errors"] == {"sd35 eager": "RuntimeError: no kernel image is available"}
    assert "- sd35 eager: RuntimeError: no kernel image is available" in gpu.render(results)


def test_compile_reaches_the_sd3_and_flux_transformers(tmp_path: Path) -> None:
    """``--compile`` (the table's ``compile`` rows) compiles an SD3/Flux transformer as it does a UNet; the
    compiled model gives the eager one's output."""
    import torch

    from tui_diffusion.pipeline import checkpoint_writer_dit as wd
    from tui_diffusion.pipeline.device import resolve_device
    from tui_diffusion.pipeline.models_dit import TensorReader, load_transformer
    from tui_diffusion.settings import DevicePolicy

    path = wd.write_flux_transformer(tmp_path / "flux.safetensors")
    _, eager = load_transformer(TensorReader(path), resolve_device(DevicePolicy("cpu")))
    _, compiled = load_transformer(TensorReader(path), resolve_device(DevicePolicy("cpu", compile=True)))
    assert eager._compiled_call_impl is None and compiled._compiled_call_impl is not None
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 64), "encoder_hidden_states": torch.randn(1, 8, 128),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "guidance": torch.tensor([3.5])}
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).sample, eager(**inputs).sample, rtol=1e-4, atol=1e-4)

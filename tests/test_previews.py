"""Sampling previews (issue 16, item 8): TAESD decoders from models/vae_approx in their original layout decode as
diffusers' AutoencoderTiny does on the same weights; the chooser takes TAESD when the family's file is there and
latent-to-RGB otherwise; previews are made only when the worker sends one (at most every 250 ms)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tui_diffusion.families import by_id
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline import previews as pv
from tui_diffusion.pipeline.device import Device

CPU = Device(torch.device("cpu"), torch.float32, torch.float32, "CPU")


# -- TAESD's decoder as its authors publish it (madebyollin/taesd): the layout the files are saved in ----------
class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def reference_decoder(latent_channels: int, seed: int = 0) -> nn.Sequential:
    """TAESD's ``Decoder()``: item 0 the clamp, then convolutions, blocks and upsamplings (random weights)."""
    torch.manual_seed(seed)

    def up() -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2), nn.Conv2d(64, 64, 3, padding=1, bias=False)]

    model = nn.Sequential(
        _Clamp(), nn.Conv2d(latent_channels, 64, 3, padding=1), nn.ReLU(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), nn.Conv2d(64, 3, 3, padding=1),
    )
    with torch.no_grad():  # default init gives near-constant images; spread the weights a little
        for p in model.parameters():
            p.mul_(1.5)
    return model.eval()


def write_taesd(path: Path, latent_channels: int = 4, seed: int = 0) -> nn.Sequential:
    """A decoder-only TAESD file as ComfyUI's vae_approx folder holds them (keys ``1.weight``, ``3.conv.0...``)."""
    model = reference_decoder(latent_channels, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def engine_for(root: Path, method: str = "auto", allow_pickle: bool = False) -> SimpleNamespace:
    from tui_diffusion.pipeline.models import ModelCache

    return SimpleNamespace(paths=ModelPaths(root), device=CPU, allow_pickle=allow_pickle, preview_method=method,
                           previewers=ModelCache(2))


@pytest.mark.parametrize("channels", [4, 16])
def test_taesd_file_decodes_as_diffusers_autoencoder_tiny(tmp_path: Path, channels: int) -> None:
    """The original-layout file, loaded, gives the image of diffusers' AutoencoderTiny holding the same decoder
    weights (put there by diffusers' own layer numbering), and of TAESD's own decoder."""
    from diffusers import AutoencoderTiny

    ref = write_taesd(tmp_path / "taesd_decoder.safetensors", channels)
    ours = pv.load_taesd_decoder(tmp_path / "taesd_decoder.safetensors")
    theirs = AutoencoderTiny(latent_channels=channels).eval()
    theirs.decoder.layers.load_state_dict({f"{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v
                                           for k, v in ref.state_dict().items()})
    z = torch.randn(1, channels, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        image = ours.decode(z, return_dict=False)[0]
        torch.testing.assert_close(image, theirs.decode(z, return_dict=False)[0])
        torch.testing.assert_close(image, ref(z).sub(0.5).mul(2), rtol=1e-5, atol=1e-5)  # TAESD's decode
    assert image.shape == (1, 3, 48, 40) and float(image.std()) > 0.01  # an image, not a constant
    preview = pv.TaesdPreviewer(ours)(z)
    assert preview.dtype == np.uint8 and preview.shape == (48, 40, 3)
    expected = ((image[0].movedim(0, -1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(preview, expected)  # ComfyUI's preview_to_image rounding


def test_diffusers_layout_and_combined_files_load(tmp_path: Path) -> None:
    """An AutoencoderTiny saved by diffusers (``decoder.layers.*``) and ComfyUI's combined TAESD file
    (``taesd_decoder.*`` beside the encoder and ``vae_scale``) load to the same decoder."""
    ref = write_taesd(tmp_path / "a.safetensors")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    state = ref.state_dict()
    save_file({f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
              | {"encoder.layers.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "b.safetensors"))
    save_file({f"taesd_decoder.{k}": v for k, v in state.items()} | {"vae_scale": torch.tensor(1.0)},
              str(tmp_path / "c.safetensors"))
    with torch.no_grad():
        images = [pv.load_taesd_decoder(tmp_path / f"{n}.safetensors").decode(z, return_dict=False)[0]
                  for n in "abc"]
    torch.testing.assert_close(images[1], images[0])
    torch.testing.assert_close(images[2], images[0])


def test_a_file_that_is_not_taesd_is_a_clear_error(tmp_path: Path) -> None:
    from tui_diffusion.modelfiles.header import CheckpointError

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"x\.safetensors: not a TAESD decoder"):
        pv.load_taesd_decoder(tmp_path / "x.safetensors")
    (tmp_path / "y.pth").write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match=r"y\.pth: a pickle file .* --allow-pickle"):
        pv.load_taesd_decoder(tmp_path / "y.pth")


def test_chooser_takes_taesd_when_the_family_file_is_there(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    sd1, sdxl, flux = (by_id(f).latent_format for f in ("sd1", "sdxl", "flux"))
    eng = engine_for(tmp_path)
    assert isinstance(pv.choose_previewer(eng, sd1, "auto"), pv.Latent2RGBPreviewer)  # no vae_approx folder
    with caplog.at_level(logging.WARNING):
        assert isinstance(pv.choose_previewer(eng, sd1, "taesd"), pv.Latent2RGBPreviewer)
    assert "taesd_decoder" in caplog.text
    write_taesd(tmp_path / "vae_approx" / "taesd_decoder.safetensors")
    write_taesd(tmp_path / "vae_approx" / "taef1_decoder.safetensors", 16)
    assert isinstance(pv.choose_previewer(eng, sd1, "auto"), pv.TaesdPreviewer)
    assert isinstance(pv.choose_previewer(eng, sd1, "taesd"), pv.TaesdPreviewer)
    assert isinstance(pv.choose_previewer(eng, sd1, "latent2rgb"), pv.Latent2RGBPreviewer)
    assert pv.choose_previewer(eng, sd1, "none") is None
    assert isinstance(pv.choose_previewer(eng, sdxl, "auto"), pv.Latent2RGBPreviewer)  # taesd_ is not taesdxl_
    flux_preview = pv.choose_previewer(eng, flux, "auto")
    assert isinstance(flux_preview, pv.TaesdPreviewer)
    assert flux_preview(torch.randn(1, 16, 4, 6)).shape == (32, 48, 3)
    assert pv.find_taesd(eng.paths, sd1) == "taesd_decoder.safetensors"
    assert len(eng.previewers._items) == 2  # loaded once per file


def test_chooser_falls_back_on_a_broken_or_refused_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd1, sdxl = by_id("sd1").latent_format, by_id("sdxl").latent_format
    (tmp_path / "vae_approx").mkdir()
    (tmp_path / "vae_approx" / "taesd_decoder.safetensors").write_bytes(b"\x00" * 20)
    torch.save(reference_decoder(4).state_dict(), tmp_path / "vae_approx" / "taesdxl_decoder.pth")
    with caplog.at_level(logging.WARNING):
        assert isinstance(pv.choose_previewer(engine_for(tmp_path), sd1, "auto"), pv.Latent2RGBPreviewer)
        assert isinstance(pv.choose_previewer(engine_for(tmp_path), sdxl, "taesd"), pv.Latent2RGBPreviewer)
    assert "taesd_decoder.safetensors" in caplog.text and "--allow-pickle" in caplog.text
    # with --allow-pickle the .pth loads (weights only)
    assert isinstance(pv.choose_previewer(engine_for(tmp_path, allow_pickle=True), sdxl, "taesd"), pv.TaesdPreviewer)


def test_a_big_latent_is_previewed_at_the_preview_size(tmp_path: Path) -> None:
    """The latent is shrunk before decoding (ComfyUI's 512 pixels by default; 64 here, to stay fast)."""
    assert pv.MAX_PREVIEW_SIDE == 512
    write_taesd(tmp_path / "taesd_decoder.safetensors")
    preview = pv.TaesdPreviewer(pv.load_taesd_decoder(tmp_path / "taesd_decoder.safetensors"), max_side=64)
    preview.share = 1.0  # no time budget: two previews in a row
    assert preview(torch.randn(1, 4, 12, 16)).shape == (48, 64, 3)
    assert preview(torch.randn(1, 4, 4, 6)).shape == (32, 48, 3)  # small ones as they are


def test_taesd_decodes_take_at_most_their_share_of_the_time(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After a decode that took t, calls within 4t (a fifth of the time) give None: no new picture, no cost."""
    write_taesd(tmp_path / "taesd_decoder.safetensors")
    preview = pv.TaesdPreviewer(pv.load_taesd_decoder(tmp_path / "taesd_decoder.safetensors"))
    now = [100.0]
    monkeypatch.setattr(pv.time, "perf_counter", lambda: now[0])
    decode = preview._decode

    def slow(x0: torch.Tensor) -> np.ndarray:
        now[0] += 1.0  # a decode of one second
        return decode(x0)

    monkeypatch.setattr(preview, "_decode", slow)
    x = torch.randn(1, 4, 2, 2)
    assert preview(x) is not None  # 100 -> 101
    now[0] = 104.9
    assert preview(x) is None
    now[0] = 105.0
    assert preview(x) is not None


def test_latent2rgb_is_the_samplers_projection() -> None:
    from tui_diffusion.pipeline.ksampler import latent_preview

    fmt = by_id("sdxl").latent_format
    x = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(pv.Latent2RGBPreviewer(fmt)(x), latent_preview(x, fmt))


def test_sampler_previews_are_made_only_when_the_worker_sends_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A KSampler run hands out previews as callables; the worker's throttle (one per 250 ms, and the last
    step) calls only those it sends, so a TAESD decode runs for 2 of 6 steps 10 ms apart."""
    import itertools
    import time

    from tests.test_dit_loaders import _ctx
    from tui_diffusion import messages as m
    from tui_diffusion.pipeline import checkpoint_writer_dit as w
    from tui_diffusion.pipeline import models_dit as md
    from tui_diffusion.pipeline.registry import implementations
    from tui_diffusion.pipeline.worker import WorkerEngine

    write_taesd(tmp_path / "vae_approx" / "taesd3_decoder.safetensors", 16)
    monkeypatch.setattr(pv.TaesdPreviewer, "share", 1.0)  # the time budget is tested on its own
    clock = itertools.count()
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0 + 0.01 * next(clock))
    events: list = []
    hooks = WorkerEngine._hooks(SimpleNamespace(emit=events.append), m.SubmitJob("j1", {}, True))
    decoded: list = []
    ctx = _ctx(tmp_path, tmp_path)
    ctx.want_previews = True

    def report(step: int, total: int, preview: object) -> None:
        assert callable(preview)

        def counted() -> np.ndarray:
            decoded.append(step)
            return preview()

        hooks.progress("3", step, total, counted)

    ctx.report = report
    net = w.build_sd3_transformer(w.TinySD3(depth=1))
    model = md.model_handle("sd3", net, CPU, "tiny")
    cond = [[torch.randn(1, 8, net.config.joint_attention_dim), {"pooled_output":
                                                                 torch.randn(1, net.config.pooled_projection_dim)}]]
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    implementations()["KSampler"](ctx, model=model, seed=1, steps=6, cfg=1.0, sampler_name="euler",
                                  scheduler="simple", positive=cond, negative=cond, latent_image=latent)
    progress = [e for e in events if isinstance(e, m.Progress)]
    assert [e.step for e in progress] == [1, 2, 3, 4, 5, 6]
    assert decoded == [1, 6]  # the first (nothing sent yet) and the last; the rest came within 250 ms
    sent = [e.preview_png for e in progress if e.preview_png]
    assert len(sent) == 2
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(sent[-1])).size == (32, 32)  # TAESD: 8x the latent, not latent-sized


@pytest.mark.slow
def test_run_preview_writes_the_taesd_preview(tmp_path: Path, models_dir: Path) -> None:
    """``tui-diffusion run --preview FILE`` end to end (a real worker): the file holds the last preview, made by
    TAESD (8x the latent: 64 pixels for a 64-pixel image) since the family's decoder is in vae_approx; the
    step cache option runs along (TaylorSeer on the SD1.x UNet)."""
    import os
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import ROOT, TINY

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models_dir / "checkpoints" / TINY, tmp_path / "models" / "checkpoints" / TINY)
    write_taesd(tmp_path / "models" / "vae_approx" / "taesd_decoder.safetensors")
    args = ["run", str(ROOT / "workflows" / "txt2img.json"), "--set", f"4.ckpt_name={TINY}", "--set", "5.width=64",
            "--set", "5.height=64", "--set", "3.steps=3", "--preview", "preview.png", "--step-cache", "taylorseer"]
    out = subprocess.run([sys.executable, "-m", "tui_diffusion", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_file()
    preview = Image.open(tmp_path / "preview.png")
    assert preview.format == "PNG" and preview.size == (64, 64)
    assert not list(tmp_path.glob(".preview.png*"))

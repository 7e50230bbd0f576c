"""Lotus depth (issue 16): LotusConditioning and SetFirstSigma as ComfyUI's nodes, the Lotus UNet recognised in its
published layout and run through UNETLoader with ComfyUI's IMG_TO_IMG model sampling, and ComfyUI's template
``sd3.5_large_depth`` (a Lotus depth map feeding an SD3.5 Large depth ControlNet) run end to end on tiny files under
the names it expects. Expected values are worked out from ComfyUI's code (``comfy_extras/nodes_lotus.py``,
``nodes_custom_sampler.SetFirstSigma``, ``model_base.Lotus``, ``model_sampling.IMG_TO_IMG``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.dit_helpers import CPU, shared_models
from tests.test_templates import _api
from tui_diffusion.families import detect
from tui_diffusion.families.lotus import LOTUS
from tui_diffusion.graph.specs import get_spec
from tui_diffusion.graph.validate import validate_workflow
from tui_diffusion.graph.workflow import Workflow
from tui_diffusion.modelfiles.header import CheckpointError, read_header
from tui_diffusion.paths import ModelPaths
from tui_diffusion.pipeline import checkpoint_writer_lotus as lw
from tui_diffusion.pipeline.context import EngineState
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.executor import Executor, Hooks, execution_order
from tui_diffusion.pipeline.models import ModelCache
from tui_diffusion.pipeline.nodes_lotus import lotus_conditioning, set_first_sigma

LOTUS_FILE = "lotus-depth-d-v1-1.safetensors"
SD_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared SD3/Flux models plus what the Lotus template adds: the Lotus UNet, an SD VAE, Stability's SD3.5
    Large depth ControlNet (control_type 2) and the input image, each under the name the template gives it."""
    from tui_diffusion.pipeline import checkpoint_writer_controlnet as cw
    from tui_diffusion.pipeline import checkpoint_writer_dit as w

    root = Path(tmp_path_factory.mktemp("lotus"))
    (root / "models").symlink_to(shared_models(tmp_path_factory), target_is_directory=True)
    lw.write_lotus_unet(root / "extra" / "diffusion_models" / LOTUS_FILE)
    lw.write_sd_vae(root / "extra" / "vae" / SD_VAE)
    sd35 = w.build_sd3_transformer(w.TinySD3(depth=1))  # the size of the shared SD3.5 checkpoint's transformer
    cw.write_dit_controlnet(root / "extra" / "controlnet" / "sd3.5_large_controlnet_depth.safetensors",
                            cw.build_sd35_controlnet(sd35, seed=2), "sd35", 2)
    (root / "input").mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for name in ("sd3.5_large_depth_input_image.png", "image_lotus_depth_v1_1_input_image.png"):
        Image.fromarray(pixels).save(root / "input" / name)
    return root


def _paths(home: Path) -> ModelPaths:
    extra = tuple((kind, home / "extra" / kind) for kind in ("diffusion_models", "vae", "controlnet"))
    return ModelPaths(home / "models", input_dir=home / "input", extra=extra)


def _engine(home: Path, tmp_path: Path) -> EngineState:
    return EngineState(CPU, ModelCache(3), _paths(home), tmp_path / "out", tmp_path / "tmp", tmp_path / "cfg")


def _output(ex: Executor, data: dict, node_id: str, index: int = 0):
    wf = Workflow.from_data(data)
    return ex.cache[ex.cache_keys(wf, execution_order(wf))[node_id]].outputs[index]


# -- the nodes ---------------------------------------------------------------------------------------------------
def test_lotus_conditioning_is_comfyuis_fixed_null_prompt() -> None:
    spec = get_spec("LotusConditioning")
    assert spec is not None and spec.inputs == () and [o.type for o in spec.outputs] == ["CONDITIONING"]
    assert spec.outputs[0].name == "conditioning" and spec.category == "conditioning/lotus"
    (cond,) = lotus_conditioning(None).outputs  # type: ignore[arg-type]
    assert len(cond) == 1
    emb, extras = cond[0]
    assert extras == {}  # no pooled output, nothing else: the bare embedding, as ComfyUI's node returns it
    assert emb.shape == (1, 2, 1024) and emb.dtype == torch.float32
    # values of ComfyUI's inlined tensor: the first and last of each token, and its extremes
    assert emb[0, 0, :3].tolist() == [-0.3134765625, -0.447509765625, -0.00823974609375]
    assert emb[0, 0, -1].item() == -0.296142578125
    assert emb[0, 1, :2].tolist() == [1.4111328125, 0.00757598876953125]
    assert emb[0, 1, -3:].tolist() == [1.0361328125, -0.67333984375, 1.5009765625]
    assert emb.max().item() == 13.0234375 and emb[0, 0].argmax().item() == 457
    assert emb.min().item() == -5.7578125
    assert torch.equal(emb.half().float(), emb)  # every value is an fp16 number, as in ComfyUI's file
    emb.zero_()  # a node that changes its input must not change the next LotusConditioning
    assert lotus_conditioning(None).outputs[0][0][0][0, 0, 0].item() == -0.3134765625  # type: ignore[arg-type]


def test_set_first_sigma_replaces_the_first_sigma_of_a_copy() -> None:
    spec = get_spec("SetFirstSigma")
    assert spec is not None and spec.category == "sampling/custom_sampling/sigmas"
    sigma = spec.input("sigma")
    assert sigma is not None and (sigma.default, sigma.min, sigma.max, sigma.step) == (136.0, 0.0, 20000.0, 0.001)
    sigmas = torch.tensor([14.6146, 7.0, 0.0])
    (out,) = set_first_sigma(None, sigmas, 10000.0).outputs  # type: ignore[arg-type]
    assert out.tolist() == [10000.0, 7.0, 0.0]
    assert sigmas.tolist() == pytest.approx([14.6146, 7.0, 0.0])  # the input is left alone (ComfyUI clones it)
    assert set_first_sigma(None, torch.tensor([1.0]), 0.5).outputs[0].tolist() == [0.5]  # type: ignore[arg-type]
    with pytest.raises(NodeError, match="SetFirstSigma"):
        set_first_sigma(None, torch.zeros(0), 1.0)  # type: ignore[arg-type]


# -- the model ---------------------------------------------------------------------------------------------------
def test_the_published_layout_is_a_lotus_unet(tmp_path: Path) -> None:
    from tui_diffusion.modelfiles.describe import describe_checkpoint
    from tui_diffusion.pipeline.checkpoint_writer import write_sd2_checkpoint

    bare = lw.write_lotus_unet(tmp_path / "lotus.safetensors")
    header = read_header(bare)
    assert "input_blocks.0.0.weight" in header and header["label_emb.0.0.weight"].shape == (128, 4)
    assert header["input_blocks.0.0.weight"].dtype == "F16"  # published in fp16
    assert detect(header) is LOTUS
    prefixed = lw.write_lotus_unet(tmp_path / "prefixed.safetensors", prefix="model.diffusion_model.")
    assert detect(read_header(prefixed)) is LOTUS
    row = describe_checkpoint(bare, "lotus.safetensors")
    assert row["supported"] and row["family"] == LOTUS.label and row["error"] is None
    # an SD2.x checkpoint (text tower, VAE, no 4-input class embedding) stays SD2.x
    assert detect(read_header(write_sd2_checkpoint(tmp_path / "sd2.safetensors"))).id == "sd2"
    # loaded as a checkpoint: a clear error saying how to load it
    from tui_diffusion.pipeline.models import load_checkpoint

    with pytest.raises(CheckpointError, match="UNETLoader"):
        load_checkpoint(bare, CPU, tmp_path / "cfg")


def test_weight_dtype_fp8_rounds_the_unets_weights(tmp_path: Path) -> None:
    path = lw.write_lotus_unet(tmp_path / "lotus.safetensors")
    header = read_header(path)
    full = LOTUS.load_diffusion_model(path, header, CPU).unet.conv_in.weight
    rounded = LOTUS.load_diffusion_model(path, header, CPU, "fp8_e4m3fn").unet.conv_in.weight
    assert rounded.dtype == torch.float32 and torch.equal(rounded, full.to(torch.float8_e4m3fn).float())
    assert not torch.equal(rounded, full)
    with pytest.raises(CheckpointError, match="weight_dtype"):
        LOTUS.load_diffusion_model(path, header, CPU, "int4")


def test_img_to_img_model_sampling() -> None:
    """ComfyUI's IMG_TO_IMG on the SD schedule: the input unscaled, the output taken as x0, sigma 10000 at the last
    training timestep, and the task embedding [sin 1, sin 0, cos 1, cos 0]."""
    from tui_diffusion.pipeline.lotus import ImgToImgSampling, task_embedding

    ms = ImgToImgSampling()
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sigma = torch.tensor([10000.0])
    assert torch.equal(ms.calculate_input(sigma, x), x)
    assert torch.equal(ms.calculate_denoised(sigma, out, x), out)
    assert ms.timestep(sigma).item() == 999
    assert ms.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert torch.equal(ms.noise_scaling(sigma, torch.zeros_like(x), x, True), x)  # no noise: the image's latent
    assert task_embedding().shape == (1, 4)
    assert task_embedding()[0].tolist() == pytest.approx([math.sin(1), 0.0, math.cos(1), 1.0])


def _lotus_graph(image: str = "sd3.5_large_depth_input_image.png") -> dict:
    """The template's Lotus subgraph as an API workflow (one Euler step from sigma 10000, no noise)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": SD_VAE}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": LOTUS_FILE, "weight_dtype": "default"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "5": {"class_type": "LotusConditioning", "inputs": {}},
        "6": {"class_type": "BasicGuider", "inputs": {"model": ["3", 0], "conditioning": ["5", 0]}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["3", 0], "scheduler": "normal", "steps": 1,
                                                         "denoise": 1.0}},
        "8": {"class_type": "SetFirstSigma", "inputs": {"sigmas": ["7", 0], "sigma": 10000.0}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "DisableNoise", "inputs": {}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["6", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["4", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}},
        "13": {"class_type": "ImageInvert", "inputs": {"image": ["12", 0]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
    }


def test_unet_loader_runs_lotus_as_comfyui_does(home: Path, tmp_path: Path) -> None:
    """UNETLoader gives a Lotus MODEL; the subgraph's single step returns the network's output for the image's
    latent at timestep 999 with the null prompt and the task embedding (computed here on a UNet built apart)."""
    from tui_diffusion.pipeline.lotus import null_prompt

    graph = _lotus_graph()
    ex = Executor(_engine(home, tmp_path))
    ex.run(graph, Hooks(), lambda: False)
    model = _output(ex, graph, "3")
    assert model.family is LOTUS and model.model_sampling.describe() == "ImgToImgSampling(x0)"
    sigmas = _output(ex, graph, "8")
    assert sigmas[0].item() == 10000.0 and sigmas[-1].item() == 0.0 and len(sigmas) == 2
    latent = _output(ex, graph, "4")["samples"]
    sampled = _output(ex, graph, "11")["samples"]
    assert _output(ex, graph, "11", 1)["samples"].allclose(sampled, atol=1e-5)  # denoised_output: the same x0

    reference = lw.build_lotus_unet()  # the writer's random weights, rounded as the fp16 file stores them
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    with torch.no_grad():
        x0 = reference(latent * 0.18215, torch.tensor([999]), encoder_hidden_states=null_prompt(),
                       class_labels=torch.tensor([[math.sin(1), 0.0, math.cos(1), 1.0]])).sample
    assert sampled.shape == latent.shape
    torch.testing.assert_close(sampled, x0 / 0.18215, atol=1e-4, rtol=1e-4)
    # without the task embedding the output differs: the class embedding is really fed
    with torch.no_grad():
        other = reference(latent * 0.18215, torch.tensor([999]), encoder_hidden_states=null_prompt(),
                          class_labels=torch.zeros(1, 4)).sample
    assert not torch.allclose(other / 0.18215, sampled, atol=1e-3)
    depth = _output(ex, graph, "13")
    decoded = _output(ex, graph, "12")
    assert torch.equal(depth, 1.0 - decoded)


def test_unet_loader_names_a_file_that_is_no_model(home: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = home / "extra" / "diffusion_models" / "not-a-model.safetensors"
    save_file({"something.weight": torch.zeros(2, 2)}, str(bad))
    graph = _lotus_graph()
    graph["3"]["inputs"]["unet_name"] = "not-a-model.safetensors"
    from tui_diffusion.pipeline.executor import JobError

    try:
        with pytest.raises(JobError, match="not-a-model.safetensors"):
            Executor(_engine(home, tmp_path)).run(graph, Hooks(), lambda: False)
    finally:
        bad.unlink()


# -- the template ------------------------------------------------------------------------------------------------
#: small sizes, as ``tui-diffusion run --set`` would set them: 0.01 megapixels makes the 40x40 input 102x102
#: (96x96 once the VAE crops it), one KSampler step
SD35_DEPTH = {"70": {"megapixels": 0.01}, "56": {"steps": 1}}


def test_sd35_large_depth_template_runs(home: Path, tmp_path: Path) -> None:
    api = _api("sd3.5_large_depth")
    assert {api[k]["class_type"] for k in api} >= {"LotusConditioning", "SetFirstSigma", "UNETLoader",
                                                   "SamplerCustomAdvanced", "ControlNetApplyAdvanced"}
    for node_id, values in SD35_DEPTH.items():
        assert set(values) <= set(api[node_id]["inputs"]), node_id
        api[node_id]["inputs"].update(values)
    assert not validate_workflow(Workflow.from_data(api), _paths(home))
    ex = Executor(_engine(home, tmp_path))
    ex.run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1
    image = np.asarray(Image.open(saved[0]))
    assert image.shape[:2] == (96, 96) and image.std() > 0  # the depth image's size, through VAEEncode


def test_lotus_depth_template_gives_the_subgraphs_depth_map(home: Path, tmp_path: Path) -> None:
    """ComfyUI's Lotus template (SetFirstSigma 999: still timestep 999, and one Euler step to sigma 0 returns x0
    whatever the first sigma) saves the depth map the nodes above give for the same image."""
    api = _api("image_lotus_depth_v1_1")
    assert not validate_workflow(Workflow.from_data(api), _paths(home))
    Executor(_engine(home, tmp_path)).run(api, Hooks(), lambda: False)
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and saved[0].name.startswith("Lotus_depth")
    image = np.asarray(Image.open(saved[0])).astype(np.int16)
    graph = _lotus_graph("image_lotus_depth_v1_1_input_image.png")
    ex = Executor(_engine(home, tmp_path / "direct"))
    ex.run(graph, Hooks(), lambda: False)
    expected = (_output(ex, graph, "13")[0].clamp(0, 1) * 255).numpy()
    assert image.shape == (40, 40, 3) and image.std() > 0
    assert np.abs(image - expected).max() <= 1.0


def test_flux_depth_lora_template_runs(home: Path, tmp_path: Path) -> None:
    """Flux dev with Black Forest Labs' depth control LoRA on the Lotus depth map. The LoRA widens ``img_in`` to the
    128 channels InstructPixToPixConditioning concatenates; without it the 64-channel Flux dev file ignores the
    depth latent (as ComfyUI does) and gives another image, which the run with the LoRA bypassed shows."""
    from tui_diffusion.pipeline import checkpoint_writer_dit as w
    from tui_diffusion.pipeline.checkpoint_writer_lora_dit import write_flux_control_lora

    extra = tmp_path / "flux"
    w.write_flux_transformer(extra / "diffusion_models" / "flux1-dev-fp8.safetensors", dtype="fp8_e4m3fn")
    write_flux_control_lora(extra / "loras" / "flux1-depth-dev-lora.safetensors", w.build_flux_transformer())
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        input_dir / "flux_depth_lora_example_input_image.png")
    api = _api("flux_depth_lora_example")
    assert api["150:37"]["class_type"] == "LoraLoaderModelOnly" and api["150:41:101"]["class_type"] == "SetFirstSigma"
    for node_id, values in {"150:107": {"megapixels": 0.01}, "150:3": {"steps": 1}}.items():
        assert set(values) <= set(api[node_id]["inputs"]), node_id
        api[node_id]["inputs"].update(values)
    lotus = _paths(home)
    paths = ModelPaths(home / "models", input_dir=input_dir,
                       extra=lotus.extra + tuple((kind, extra / kind) for kind in ("diffusion_models", "loras")))
    assert not validate_workflow(Workflow.from_data(api), paths)

    def run(data: dict, out: Path) -> np.ndarray:
        engine = EngineState(CPU, ModelCache(3), paths, out, tmp_path / "tmp", tmp_path / "cfg")
        Executor(engine).run(data, Hooks(), lambda: False)
        saved = sorted(out.glob("*.png"))
        assert len(saved) == 1 and saved[0].name.startswith("Flux.1_dev")
        return np.asarray(Image.open(saved[0])).astype(np.int16)

    image = run(api, tmp_path / "out")
    assert image.shape[:2] == (96, 96) and image.std() > 0
    api["150:3"]["inputs"]["model"] = api["150:37"]["inputs"]["model"]  # the LoRA bypassed
    assert np.abs(run(api, tmp_path / "out-bare") - image).mean() > 1.0

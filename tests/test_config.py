"""Settings precedence (option > environment > file > default) and ComfyUI's extra_model_paths.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tui_diffusion.config import ConfigError, resolve
from tui_diffusion.paths import PathError, read_extra_model_paths


@pytest.fixture()
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(path))
    for name in ("MODELS_DIR", "OUTPUT_DIR", "MEMORY", "MAX_CHECKPOINTS", "THEME", "DEVICE"):
        monkeypatch.delenv(f"TUI_DIFFUSION_{name}", raising=False)
    return path


def test_precedence(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text('models_dir = "/from/file"\noutput_dir = "/file/out"\nmemory = "lowvram"\n'
                           'max_checkpoints = 4\n')
    monkeypatch.setenv("TUI_DIFFUSION_OUTPUT_DIR", "/env/out")
    monkeypatch.setenv("TUI_DIFFUSION_MEMORY", "novram")
    s = resolve({"memory": "highvram"})
    assert s.values["memory"] == "highvram" and s.sources["memory"] == "option"
    assert s.values["output_dir"] == Path("/env/out") and s.sources["output_dir"].startswith("environment")
    assert s.values["models_dir"] == Path("/from/file") and s.sources["models_dir"].startswith("file")
    assert s.values["max_checkpoints"] == 4
    assert s.values["theme"] == "textual-dark" and s.sources["theme"] == "default"
    assert s.worker_config().device.memory == "highvram" and s.worker_config().max_checkpoints == 4


def test_bad_config_files_name_the_file_and_the_setting(config_file: Path) -> None:
    config_file.write_text('memory = "lots"\n')
    with pytest.raises(ConfigError, match=r"config.toml: memory = 'lots' is not one of"):
        resolve()
    config_file.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve()
    config_file.write_text("memory = \n")
    with pytest.raises(ConfigError, match="config.toml"):
        resolve()


def test_config_command_shows_values_and_sources(config_file: Path, tmp_path: Path) -> None:
    config_file.write_text('theme = "nord"\n')
    out = subprocess.run([sys.executable, "-m", "tui_diffusion", "config", "--json"], capture_output=True, text=True,
                         check=True)
    data = json.loads(out.stdout)
    assert data["theme"] == {"value": "nord", "from": f"file ({config_file})"}
    assert data["memory"]["from"] == "default"


EXTRA = """
comfyui:
    base_path: {comfy}
    is_default: true
    checkpoints: models/checkpoints/
    loras: models/loras/
a111:
    base_path: {a1111}
    checkpoints: models/Stable-diffusion
    vae: models/VAE
    loras: |
         models/Lora
         models/LyCORIS
    embeddings: embeddings
    upscale_models: models/ESRGAN
    hypernetworks: models/hypernetworks
    photomaker: models/photomaker
"""


def test_extra_model_paths_with_both_sections(tmp_path: Path) -> None:
    from tui_diffusion.paths import ModelPaths

    comfy, a1111 = tmp_path / "ComfyUI", tmp_path / "webui"
    (comfy / "models" / "checkpoints" / "sdxl").mkdir(parents=True)
    (comfy / "models" / "checkpoints" / "sdxl" / "base.safetensors").write_bytes(b"x")
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    (a1111 / "models" / "Stable-diffusion" / "dreamshaper.safetensors").write_bytes(b"x")
    (a1111 / "models" / "LyCORIS").mkdir(parents=True)
    (a1111 / "models" / "LyCORIS" / "style.safetensors").write_bytes(b"x")
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(EXTRA.format(comfy=comfy, a1111=a1111))
    extra = read_extra_model_paths(yaml_file)
    assert ("loras", a1111 / "models" / "LyCORIS") in extra and ("vae", a1111 / "models" / "VAE") in extra
    assert ("upscale_models", a1111 / "models" / "ESRGAN") in extra
    assert ("hypernetworks", a1111 / "models" / "hypernetworks") in extra  # HypernetworkLoader reads it
    assert all(kind != "photomaker" for kind, _ in extra)  # a kind no loader reads is left out
    paths = ModelPaths(tmp_path / "own-models", None, extra)
    assert paths.list("checkpoints") == ["dreamshaper.safetensors", "sdxl/base.safetensors"]
    assert paths.resolve("loras", "style.safetensors") == a1111 / "models" / "LyCORIS" / "style.safetensors"
    with pytest.raises(PathError, match="not found in"):
        paths.resolve("checkpoints", "missing.safetensors")
    with pytest.raises(PathError, match="points outside"):
        paths.resolve("checkpoints", "../../etc/passwd")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(PathError, match="bad.yaml: not an extra_model_paths.yaml"):
        read_extra_model_paths(bad)

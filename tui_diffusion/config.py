"""Settings: every one an option, an environment variable and a key in a TOML file, in that precedence
(option > environment > file > default). ``tui-diffusion config`` shows where each value came from.
Torch-free.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from tui_diffusion.paths import ModelPaths, PathError, read_extra_model_paths
from tui_diffusion.settings import MEMORY_MODES, PRECISIONS, DevicePolicy, Limits, WorkerConfig

CONFIG_ENV = "TUI_DIFFUSION_CONFIG"


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return "TUI_DIFFUSION_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("models_dir", "models", "models folder in ComfyUI's layout (checkpoints/, loras/, vae/, ...)", Path),
    Setting("output_dir", "output", "where SaveImage writes", Path),
    Setting("input_dir", "input", "where LoadImage reads images", Path),
    Setting("workflows_dir", "workflows", "where the app's open dialog looks for workflows", Path),
    Setting("extra_model_paths", None, "a ComfyUI extra_model_paths.yaml: other installs' model folders", Path),
    Setting("device", "auto", "auto (CUDA, then MPS, then CPU), cpu, or a torch device such as cuda:1"),
    Setting("memory", "normal", "normal, highvram, lowvram or novram", choices=MEMORY_MODES),
    Setting("precision", None, "UNet and text encoder precision (default: fp16 on a GPU, fp32 on the CPU)",
            choices=PRECISIONS),
    Setting("vae_precision", None, "VAE precision (default fp32)", choices=PRECISIONS),
    Setting("max_checkpoints", 2, "loaded checkpoints kept in memory between jobs", int),
    Setting("compile", False, "torch.compile the UNet: slow first job per checkpoint and size, faster steps", bool),
    Setting("allow_pickle", False, "load .ckpt/.pt/.bin checkpoints (torch.load with weights_only=True only)",
            bool),
    Setting("max_side", Limits.max_side, "the widest or tallest image a workflow may ask for, in pixels", int),
    Setting("max_batch", Limits.max_batch, "the most images in one batch", int),
    Setting("max_prompt_chars", Limits.max_prompt_chars, "the longest prompt, in characters", int),
    Setting("theme", "textual-dark", "the app's Textual theme"),
)
BY_NAME = {s.name: s for s in SETTINGS}


class ConfigError(ValueError):
    pass


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or platformdirs.user_config_path("tui-diffusion") / "config.toml")


def _convert(setting: Setting, raw: Any, where: str) -> Any:
    if raw is None:
        return None
    if setting.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: {setting.name} = {raw!r} is not true or false")
    try:
        value = setting.kind(raw) if setting.kind is not str else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {setting.name} = {raw!r} is not a {setting.kind.__name__}") from None
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{where}: {setting.name} = {raw!r} is not one of {', '.join(setting.choices)}")
    return value


@dataclass
class Settings:
    values: dict[str, Any]
    sources: dict[str, str]

    def model_paths(self) -> ModelPaths:
        extra: tuple = ()
        if self.values["extra_model_paths"] is not None:
            try:
                extra = read_extra_model_paths(Path(self.values["extra_model_paths"]))
            except PathError as exc:
                raise ConfigError(str(exc)) from None
        return ModelPaths(self.values["models_dir"], self.values["input_dir"], extra)

    def worker_config(self) -> WorkerConfig:
        paths = self.model_paths()
        return WorkerConfig(
            models_dir=paths.root, input_dir=paths.folder("input"), output_dir=self.values["output_dir"],
            extra_model_paths=paths.extra,
            device=DevicePolicy(self.values["device"], memory=self.values["memory"],
                                precision=self.values["precision"], vae_precision=self.values["vae_precision"],
                                compile=self.values["compile"]),
            max_checkpoints=self.values["max_checkpoints"],
            allow_pickle=self.values["allow_pickle"],
            limits=self.limits(),
        )

    def limits(self) -> Limits:
        return Limits(self.values["max_side"], self.values["max_batch"], self.values["max_prompt_chars"])


def resolve(options: dict[str, Any] | argparse.Namespace | None = None) -> Settings:
    """Each setting from the first of: a given option, the environment, the config file, the default."""
    if isinstance(options, argparse.Namespace):
        options = vars(options)
    options = options or {}
    file = config_path()
    from_file: dict[str, Any] = {}
    if file.is_file():
        try:
            from_file = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from None
        unknown = sorted(set(from_file) - set(BY_NAME))
        if unknown:
            raise ConfigError(f"{file}: unknown setting(s): {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        if options.get(s.name) is not None:
            values[s.name], sources[s.name] = _convert(s, options[s.name], "option"), "option"
        elif os.environ.get(s.env):
            values[s.name], sources[s.name] = _convert(s, os.environ[s.env], f"${s.env}"), f"environment ({s.env})"
        elif s.name in from_file:
            values[s.name], sources[s.name] = _convert(s, from_file[s.name], str(file)), f"file ({file})"
        else:
            values[s.name], sources[s.name] = _convert(s, s.default, "default"), "default"
    return Settings(values, sources)

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
from tui_diffusion.settings import (
    MEMORY_MODES,
    PRECISIONS,
    PREVIEW_METHODS,
    STEP_CACHE_METHODS,
    DevicePolicy,
    Limits,
    WorkerConfig,
)
from tui_diffusion.text import printable

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
    Setting("preview_method", "auto", "sampling previews: auto (TAESD from models/vae_approx when there, else "
            "latent2rgb), latent2rgb, taesd or none", choices=PREVIEW_METHODS),
    Setting("step_cache", "none", "skip work between similar sampling steps (opt-in, changes the image a little): "
            "none, first_block_cache (SD3.x/Flux.1) or taylorseer", choices=STEP_CACHE_METHODS),
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
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)} is not true or false")
    if setting.kind is int:
        return _whole_number(setting, raw, where)
    if not isinstance(raw, (str, os.PathLike)):  # a TOML number, table or list where text or a path belongs
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)} is not a {setting.kind.__name__}")
    try:
        value = setting.kind(raw) if setting.kind is not str else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)} is not a {setting.kind.__name__}") from None
    if setting.kind is Path and "\0" in str(value):
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)}: a path cannot hold a NUL character")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)} is not one of {', '.join(setting.choices)}")
    return value


def _shown(raw: Any) -> str:
    """A value as a message quotes it: escaped and cut short (a settings file can hold anything)."""
    text = printable(repr(raw))
    return text if len(text) <= 80 else text[:77] + "..."


def _whole_number(setting: Setting, raw: Any, where: str) -> int:
    """A count or a limit: a whole number of at least 1, from TOML (an integer, or a float such as 4096.0)
    or from text (an option, the environment). Infinity, NaN, 2.5, true and 5000-digit strings are refused."""
    value: Any = raw
    if isinstance(raw, str) and len(raw.strip()) <= 20:
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    if type(value) is not int:
        raise ConfigError(f"{where}: {setting.name} = {_shown(raw)} is not a whole number")
    if value < 1:
        raise ConfigError(f"{where}: {setting.name} = {value} must be at least 1")
    return value


@dataclass
class Settings:
    values: dict[str, Any]
    sources: dict[str, str]

    def model_paths(self) -> ModelPaths:
        extra: tuple = ()
        if self.values["extra_model_paths"] is not None:
            file = Path(self.values["extra_model_paths"])
            try:
                extra = read_extra_model_paths(file)
            except PathError as exc:
                raise ConfigError(printable(str(exc))) from None
            except RecursionError:
                raise ConfigError(f"{file}: not an extra_model_paths.yaml (nested too deeply)") from None
            except (ValueError, TypeError) as exc:  # not UTF-8, a 5000-digit number, a key YAML cannot hash
                raise ConfigError(f"{file}: not an extra_model_paths.yaml ({type(exc).__name__}: "
                                  f"{printable(str(exc).split(';')[0])})") from None
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
            preview_method=self.values["preview_method"],
            step_cache=self.values["step_cache"],
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
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not a TOML settings file (not UTF-8 text)") from None
        except RecursionError:
            raise ConfigError(f"{file}: not a TOML settings file (nested too deeply)") from None
        except ValueError as exc:  # TOMLDecodeError, or an integer of over 4300 digits
            raise ConfigError(f"{file}: not a TOML settings file: {printable(str(exc).split(';')[0])}") from None
        unknown = sorted(set(from_file) - set(BY_NAME))
        if unknown:
            raise ConfigError(f"{file}: unknown setting(s): {printable(', '.join(unknown))} "
                              f"(known: {', '.join(BY_NAME)})")
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

"""Settings, declared once (``SETTINGS``): each one is a command-line option, an environment variable and a
key in a TOML file, in that precedence (option > environment > file > default), and the worker's config is
built from them by field name. The options (``add_options``), the arguments a background server is started
with (``option_args``), the README's table (``settings_table``) and ``tui-diffusion config`` are all derived
from the one tuple, so a new setting is one line here (and a field of ``WorkerConfig``, ``DevicePolicy`` or
``Limits`` when the worker needs it). Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
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
log = logging.getLogger("tui_diffusion.config")

#: which commands take a setting as an option: ``folders`` every command that reads models, ``output`` those
#: that write images too, ``engine`` those that run jobs (and ``doctor``), ``app`` only the terminal app
GROUPS = ("folders", "output", "engine", "app")


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[str, ...] | None = None
    #: the commands that take it as an option (``GROUPS``)
    group: str = "engine"
    #: options that set a fixed value (``--cpu`` is device = cpu): (flag, value, help)
    presets: tuple[tuple[str, Any, str], ...] = ()

    @property
    def env(self) -> str:
        return "TUI_DIFFUSION_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("models_dir", "models", "models folder in ComfyUI's layout (checkpoints/, loras/, vae/, ...)", Path,
            group="folders"),
    Setting("output_dir", "output", "where SaveImage writes", Path, group="output"),
    Setting("input_dir", "input", "where LoadImage reads images", Path, group="folders"),
    Setting("workflows_dir", "workflows", "where the app's open dialog looks for workflows", Path, group="app"),
    Setting("extra_model_paths", None, "a ComfyUI extra_model_paths.yaml: other installs' model folders", Path,
            group="folders"),
    Setting("device", "auto", "auto (CUDA, then MPS, then CPU), cpu, or a torch device such as cuda:1",
            presets=(("--cpu", "cpu", "run on the CPU even when a GPU is present"),)),
    Setting("memory", "normal", "normal, highvram, lowvram or novram", choices=MEMORY_MODES,
            presets=(("--highvram", "highvram", "keep every model on the GPU (the default does too)"),
                     ("--lowvram", "lowvram", "GPUs under 3 GB: each model on the GPU only while it runs; VAE in "
                                              "tiles"),
                     ("--novram", "novram", "layer-by-layer offload: slowest, least GPU memory"))),
    Setting("precision", None, "UNet and text encoder precision (default: fp16 on a GPU, fp32 on the CPU)",
            choices=PRECISIONS),
    Setting("vae_precision", None, "VAE precision (default fp32)", choices=PRECISIONS),
    Setting("max_checkpoints", 2, "loaded checkpoints kept in memory between jobs", int),
    Setting("compile", False,
            "torch.compile the UNet or transformer: slow first job per checkpoint and size, faster steps", bool),
    Setting("allow_pickle", False, "load .ckpt/.pt/.bin checkpoints (torch.load with weights_only=True only)",
            bool),
    Setting("max_side", Limits.max_side, "the widest or tallest image a workflow may ask for, in pixels", int),
    Setting("max_batch", Limits.max_batch, "the most images in one batch", int),
    Setting("max_prompt_chars", Limits.max_prompt_chars, "the longest prompt, in characters", int),
    Setting("preview_method", "auto", "sampling previews: auto (TAESD from models/vae_approx when there, else "
            "latent2rgb), latent2rgb, taesd or none", choices=PREVIEW_METHODS),
    Setting("step_cache", "none", "skip work between similar sampling steps (opt-in, changes the image a little): "
            "none, first_block_cache (SD3.x/Flux.1) or taylorseer", choices=STEP_CACHE_METHODS),
    Setting("theme", "textual-dark", "the app's Textual theme", group="app"),
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
        """The worker's config: each setting goes to the field of ``WorkerConfig``, ``DevicePolicy`` or ``Limits``
        of its name; the folders go through ``ModelPaths`` (extra_model_paths read, input beside models)."""
        paths = self.model_paths()
        return WorkerConfig(
            **self._fields(WorkerConfig, skip=("models_dir", "input_dir", "extra_model_paths", "device", "limits")),
            models_dir=paths.root, input_dir=paths.folder("input"), extra_model_paths=paths.extra,
            device=DevicePolicy(**self._fields(DevicePolicy)), limits=self.limits(),
        )

    def limits(self) -> Limits:
        return Limits(**self._fields(Limits))

    def _fields(self, target: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(target)} - set(skip)
        return {name: value for name, value in self.values.items() if name in names}


# -- derived: options, server arguments, the README's table --------------------------------------------------
_METAVARS: dict[type, str] = {Path: "PATH", int: "N"}


def add_options(parser: argparse.ArgumentParser, *groups: str) -> None:
    """The options of the settings in ``groups``: ``--name-with-dashes`` (a flag for a boolean), with the
    setting's presets beside it. Each defaults to None, so an option given wins and one left out falls to the
    environment, the file or the default (``resolve``)."""
    for s in SETTINGS:
        if s.group not in groups:
            continue
        target: Any = parser.add_mutually_exclusive_group() if s.presets else parser
        shown = "" if s.default is None else f"; default {s.default}"
        text = f"{s.help} (${s.env}{shown})"
        try:
            if s.kind is bool:
                target.add_argument(s.flag, dest=s.name, action="store_true", default=None, help=text)
            else:
                metavar = None if s.choices else _METAVARS.get(s.kind, "VALUE")
                target.add_argument(s.flag, dest=s.name, default=None, choices=s.choices, help=text,
                                    type=s.kind if s.kind is Path else str, metavar=metavar)
            for flag, value, about in s.presets:
                target.add_argument(flag, dest=s.name, action="store_const", const=value, help=about)
        except argparse.ArgumentError as exc:  # a command that declares the option itself keeps its own
            log.debug("%s: declared by the command, not derived (%s)", s.flag, exc)


def option_args(options: argparse.Namespace, *groups: str) -> list[str]:
    """The options given on this command line for the settings in ``groups``, as arguments for another
    command (a background server started by the app); paths made absolute, presets kept as typed."""
    out: list[str] = []
    for s in SETTINGS:
        value = getattr(options, s.name, None)
        if s.group not in groups or value is None:
            continue
        preset = next((flag for flag, const, _ in s.presets if const == value), None)
        if preset is not None:
            out.append(preset)
        elif s.kind is bool:
            out += [s.flag] if value else []
        else:
            out += [s.flag, str(Path(value).resolve()) if s.kind is Path else str(value)]
    return out


def settings_table() -> str:
    """The README's table of settings (a test keeps the README's copy equal to this)."""
    rows = ["| setting (TOML key) | option | environment | default | what it does |",
            "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        flags = " ".join(f"`{f}`" for f in (s.flag, *(p[0] for p in s.presets)))
        if s.group == "app":
            flags += " (app)"
        default = "" if s.default is None else f"`{s.default}`"
        about = s.help + (f" ({', '.join(s.choices)})" if s.choices and not any(c in s.help for c in s.choices)
                          else "")
        rows.append(f"| `{s.name}` | {flags} | `{s.env}` | {default} | {about.replace('|', '/')} |")
    return "\n".join(rows)


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

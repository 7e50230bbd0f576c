"""Settings declared once (issue 18): the options, the worker's config, the server's arguments and the README's
table all come from ``config.SETTINGS``, with the precedence option > environment > file > default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tui_diffusion.cli import _server_args, build_parser, build_tui_parser, settings
from tui_diffusion.config import SETTINGS, option_args, resolve, settings_table
from tui_diffusion.settings import DevicePolicy, Limits, WorkerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUI_DIFFUSION_CONFIG", str(tmp_path / "absent.toml"))
    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)


def _other_value(name: str) -> str:
    """A value for each setting that is not its default, as typed on a command line."""
    s = next(s for s in SETTINGS if s.name == name)
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.kind is int:
        return str(int(s.default) + 3)
    return {"device": "cpu"}.get(name, f"/some/{name}")


def test_the_readme_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- settings-table")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end of settings-table -->")].strip()
    assert table == settings_table(), "run `tui-diffusion config --table` and paste it into the README"


def test_every_setting_is_an_option_of_the_app_and_each_reaches_the_worker_config(tmp_path: Path) -> None:
    yaml = tmp_path / "extra.yaml"
    yaml.write_text("comfyui:\n  base_path: /nowhere\n  checkpoints: models/checkpoints\n")
    argv: list[str] = []
    given: dict[str, str] = {}
    for s in SETTINGS:
        if s.kind is bool:
            argv.append(s.flag)
        else:
            given[s.name] = str(yaml) if s.name == "extra_model_paths" else _other_value(s.name)
            argv += [s.flag, given[s.name]]
    args = build_tui_parser().parse_args(argv)
    resolved = settings(args)
    assert all(resolved.sources[s.name] == "option" for s in SETTINGS)
    config = resolved.worker_config()
    targets = {WorkerConfig: config, DevicePolicy: config.device, Limits: config.limits}
    reached = set()
    for kind, obj in targets.items():
        for field in dataclasses.fields(kind):
            if dataclasses.is_dataclass(getattr(obj, field.name)):
                continue  # the device policy and the limits: checked field by field below
            if field.name in given and field.name not in ("input_dir", "extra_model_paths"):
                expected = given[field.name]
                value = getattr(obj, field.name)
                assert str(value) == expected, field.name
                reached.add(field.name)
            elif any(s.name == field.name and s.kind is bool for s in SETTINGS):
                assert getattr(obj, field.name) is True, field.name
                reached.add(field.name)
    assert config.extra_model_paths  # read from the file the option named
    app_only = {s.name for s in SETTINGS if s.group == "app"}
    paths = {"input_dir", "extra_model_paths"}
    assert reached | app_only | paths == {s.name for s in SETTINGS}


def test_presets_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["run", "wf.json", "--cpu", "--lowvram"])
    assert (args.device, args.memory) == ("cpu", "lowvram")
    monkeypatch.setenv("TUI_DIFFUSION_MAX_CHECKPOINTS", "7")
    monkeypatch.setenv("TUI_DIFFUSION_MEMORY", "novram")
    resolved = settings(args)
    assert resolved.values["memory"] == "lowvram" and resolved.sources["memory"] == "option"
    assert resolved.values["max_checkpoints"] == 7 and resolved.sources["max_checkpoints"].startswith("environment")
    assert resolve().values["theme"] == "textual-dark"
    with pytest.raises(SystemExit):  # one of them, not both
        build_parser().parse_args(["run", "wf.json", "--highvram", "--memory", "lowvram"])


def test_a_background_server_gets_the_same_settings_as_the_command_that_starts_it(tmp_path: Path) -> None:
    argv = ["--models-dir", "rel/models", "--cpu", "--novram", "--compile", "--max-side", "1024",
            "--precision", "bf16", "--workers", "2", "--theme", "nord"]
    args = build_tui_parser().parse_args(argv)
    passed = _server_args(args)
    assert "--theme" not in passed  # the app's own
    serve = build_parser().parse_args(["serve", *passed])
    for s in SETTINGS:
        if s.group != "app":
            expected = getattr(args, s.name)
            expected = str(Path(expected).resolve()) if s.kind is Path and expected is not None else expected
            got = getattr(serve, s.name)
            assert (str(got) if s.kind is Path and got is not None else got) == expected, s.name
    assert serve.workers == 2
    assert option_args(serve, "folders") == ["--models-dir", str(Path("rel/models").resolve())]

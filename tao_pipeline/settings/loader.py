"""Where settings come from, and the one function that loads them.

Settings come from, in order of precedence:
1. dotted overrides (``generation.num_samples=4``) from the CLI, the Dagster launchpad or `tao ui --set`,
2. a TOML file (``--config``, the ``TAO_CONFIG`` variable, or ``./tao.toml`` if present),
3. the defaults in :mod:`tao_pipeline.settings.sections`.

``TAO_HOME`` sets the home folder when the file does not. Every error names the setting.

A :class:`SettingsSource` is the pair (config file, overrides). Every consumer gets settings the
same way: the CLI builds a source from its flags; the Dagster processes that `tao ui` starts get
the same source through the environment (``TAO_CONFIG``, ``TAO_OVERRIDES``), which the settings
resource reads when the code location loads; a launchpad run may replace it in run config.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tao_pipeline.settings.sections import TaoSettings

CONFIG_ENV = "TAO_CONFIG"
OVERRIDES_ENV = "TAO_OVERRIDES"  # a JSON list of "section.name=value" strings


class SettingsError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class SettingsSource:
    """A config file (None: ``$TAO_CONFIG`` or ``./tao.toml``) and dotted overrides applied on top."""

    config_file: str | None = None
    overrides: tuple[str, ...] = ()

    def load(self) -> TaoSettings:
        return load_settings(self.config_file, list(self.overrides))

    @classmethod
    def from_environment(cls) -> SettingsSource:
        """The source a Dagster process was started with (see :meth:`environment`)."""
        raw = os.environ.get(OVERRIDES_ENV, "")
        try:
            overrides = json.loads(raw) if raw else []
        except json.JSONDecodeError:
            raise SettingsError(f"${OVERRIDES_ENV} must be a JSON list of 'section.name=value' strings") from None
        if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
            raise SettingsError(f"${OVERRIDES_ENV} must be a JSON list of 'section.name=value' strings")
        return cls(os.environ.get(CONFIG_ENV) or None, tuple(overrides))

    def environment(self) -> dict[str, str]:
        """Variables that hand this source to a child process (e.g. the `dagster dev` that `tao ui` starts)."""
        variables = {OVERRIDES_ENV: json.dumps(list(self.overrides))}
        if self.config_file:
            variables[CONFIG_ENV] = str(Path(self.config_file).resolve())
        return variables


def parse_override(item: str) -> tuple[list[str], Any]:
    """'training.max_steps=3' -> (['training', 'max_steps'], 3); values are parsed as TOML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"override {item!r} must look like section.name=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare strings need no quotes
    return key.strip().split("."), value


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise SettingsError(f"setting {'.'.join(path)!r}: {part!r} is not a section")
    tree[path[-1]] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        name = ".".join(str(part) for part in problem["loc"])
        if name:
            lines.append(f"setting {name!r}: {message} (got {problem.get('input')!r:.80})")
        else:  # a check across settings: its message names them, and the input is the whole tree
            lines.append(message)
    return "invalid settings: " + "; ".join(" ".join(line.split()) for line in lines)  # one line, however many


def default_config_file() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit)
    local = Path("tao.toml")
    return local if local.exists() else None


def load_settings(config_file: str | Path | None = None, overrides: list[str] | None = None) -> TaoSettings:
    """Build settings from a TOML file and dotted overrides; raise SettingsError naming the bad setting."""
    path = Path(config_file) if config_file else default_config_file()
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_config(path)
        _resolve_relative_paths(tree, path.parent)
    for item in overrides or []:
        _apply(tree, *parse_override(item))
    try:
        return TaoSettings.model_validate(tree)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def _read_config(path: Path) -> dict[str, Any]:
    """A TOML config file's tree, or SettingsError saying in one line why it cannot be read."""
    if path.is_dir():
        raise SettingsError(f"config file {str(path)!r} is a folder, not a TOML file")
    if not path.is_file():
        raise SettingsError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SettingsError(f"config file {str(path)!r} cannot be read: {error.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark is not content
    except UnicodeDecodeError as error:
        utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
        found = "UTF-16" if utf16 else f"not UTF-8 (byte {error.start}: {raw[error.start : error.start + 1]!r})"
        raise SettingsError(f"config file {str(path)!r} is {found}; TOML files are UTF-8: save it as UTF-8") from None
    if "\x00" in text:
        raise SettingsError(
            f"config file {str(path)!r} holds NUL bytes (UTF-16?); TOML files are UTF-8: save it as UTF-8"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    """Paths in a config file are relative to that file, not to the working directory. A section that is
    not a table is left alone: validation names it."""

    def section(*names: str) -> dict[str, Any]:
        found: Any = tree
        for name in names:
            found = found.get(name, {}) if isinstance(found, dict) else {}
        return found if isinstance(found, dict) else {}

    data, flywheel = section("data"), section("flywheel")
    if isinstance(data.get("logs"), list):
        data["logs"] = [str(base / p) if isinstance(p, str) else p for p in data["logs"]]
    if isinstance(data.get("labels"), str):
        data["labels"] = str(base / data["labels"])
    if isinstance(tree.get("home"), str):
        tree["home"] = str(base / Path(tree["home"]).expanduser())
    if isinstance(flywheel.get("inbox"), str):
        flywheel["inbox"] = str(base / Path(flywheel["inbox"]).expanduser())
    table = section("flywheel", "table_source")
    if isinstance(table.get("database"), str):
        table["database"] = str(base / Path(table["database"]).expanduser())
    training = section("training")
    if isinstance(training.get("accelerate_config"), str):
        training["accelerate_config"] = str(base / Path(training["accelerate_config"]).expanduser())
    model = section("model")
    if isinstance(model.get("base"), str) and model["base"].startswith("."):
        model["base"] = str(base / model["base"])

"""Settings, second pass: what would break later fails at load time, in one line naming the setting.

Numbers are finite and in sane ranges (inf and nan pass a ``gt=0`` bound and then wait forever or fail
every call); named files exist and are files; config files that are not UTF-8 TOML, or sections that
are not tables, are named rather than crashing.
"""

from __future__ import annotations

import re
import typing

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from tao_pipeline.cli.commands import main
from tao_pipeline.settings import SettingsError, TaoSettings, load_settings

NOT_FINITE = ["inf", "-inf", "nan", "1e999"]


def float_settings(model=None, prefix: str = "") -> list[str]:
    """Every setting whose type admits a float, in every section (scorer options are their scorers' own)."""
    model = model if model is not None else TaoSettings()
    found = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found += float_settings(value, f"{prefix}{name}.")
        elif float in typing.get_args(field.annotation) or field.annotation is float:
            found.append(f"{prefix}{name}")
    return found


FLOAT_SETTINGS = float_settings()


def test_the_float_settings_are_found():
    assert {"compute_scale", "flywheel.settle_seconds", "training.learning_rate", "training.epochs"} <= set(
        FLOAT_SETTINGS
    )
    assert len(FLOAT_SETTINGS) >= 30


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", NOT_FINITE)
def test_no_setting_takes_a_number_that_is_not_finite(name, value):
    with pytest.raises(SettingsError, match=rf"setting '{name}'"):
        load_settings(None, [f"{name}={value}"])


@pytest.mark.parametrize(
    "override, named",
    [
        ("flywheel.settle_seconds=1e9", "flywheel.settle_seconds"),
        ("flywheel.run_start_timeout_s=1e12", "flywheel.run_start_timeout_s"),
        ("flywheel.sensor_interval_s=100000000", "flywheel.sensor_interval_s"),
        ("generation.endpoint.timeout_s=1e7", "generation.endpoint.timeout_s"),
        ("generation.endpoint.max_retries=1000000", "generation.endpoint.max_retries"),
        ("compute_scale=1e300", "compute_scale"),
        ("data.min_prompt_chars=100", "min_prompt_chars=100 is above max_prompt_chars"),
    ],
)
def test_finite_but_absurd_values_are_refused(override, named, tmp_path):
    extra = ["data.max_prompt_chars=50"] if "min_prompt_chars" in override else []
    with pytest.raises(SettingsError, match=named):
        load_settings(None, [override, *extra])


@pytest.mark.parametrize(
    "content, said",
    [
        ("home = 'x'\n# café\n".encode("latin-1"), "is not UTF-8 (byte"),
        ("home = 'x'\n".encode("utf-16"), "is UTF-16"),
        ("home = 'x'\n".encode("utf-16-be"), "holds NUL bytes (UTF-16?)"),
        (b'data = "x"\n', "setting 'data': Input should be a valid dictionary"),
        (b"flywheel = 3\n", "setting 'flywheel': Input should be a valid dictionary"),
        (b'[flywheel]\ntable_source = "x"\n', "setting 'flywheel.table_source'"),
        (b"[data]\nlogs = [3]\n", "setting 'data.logs.0'"),
        (b"[data\n", "is not valid TOML"),
        (b"\xef\xbb\xbfhome = 'x'\n[data]\nlogs = 'nope.jsonl'\n", "setting 'data.logs'"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, content, said):
    config = tmp_path / "tao.toml"
    config.write_bytes(content)
    with pytest.raises(SettingsError, match=re.escape(said)):
        load_settings(config)
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exit_code != 0 and "Traceback" not in result.output and said in result.output


def test_a_config_path_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(SettingsError, match="is a folder, not a TOML file"):
        load_settings(tmp_path)


def test_a_byte_order_mark_is_not_content(tmp_path):
    config = tmp_path / "tao.toml"
    config.write_bytes(b"\xef\xbb\xbf" + f"home = '{tmp_path / 'h'}'\n".encode())
    assert load_settings(config).home == (tmp_path / "h").resolve()


def test_named_files_must_exist_and_be_files(tmp_path):
    with pytest.raises(SettingsError, match=r"setting 'data.logs': '.*nope.jsonl' does not exist"):
        load_settings(None, [f"data.logs=['{tmp_path / 'nope.jsonl'}']"])
    with pytest.raises(SettingsError, match=r"setting 'data.logs': '.*' is not a file"):
        load_settings(None, [f"data.logs=['{tmp_path}']"])
    with pytest.raises(SettingsError, match=r"setting 'data.labels': '.*' is a folder, not a labels file"):
        load_settings(None, [f"data.labels='{tmp_path}'"])
    with pytest.raises(SettingsError, match=r"setting 'data.labels': '.*' is missing, not a labels file"):
        load_settings(None, [f"data.labels='{tmp_path / 'labels.jsonl'}'"])


def test_compute_scale_inf_is_one_line_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TAO_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["round", "--set", "compute_scale=inf"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "setting 'compute_scale': Input should be a finite number" in result.output

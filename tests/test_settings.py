"""tao_pipeline.settings: defaults, TOML files, dotted overrides, path resolution and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tao_pipeline.demo import DEMO_CONFIG, DEMO_LABELS, DEMO_LOGS
from tao_pipeline.settings import (
    DataSettings,
    GenerationSettings,
    ScoringSettings,
    SettingsError,
    TaoSettings,
    load_settings,
    parse_override,
)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No TAO_CONFIG, no ./tao.toml, TAO_HOME inside tmp_path."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("TAO_CONFIG", raising=False)
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "env-home"))


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ---------------------------------------------------------------------------


def test_defaults_without_any_config(tmp_path):
    settings = load_settings()
    assert settings == TaoSettings()
    assert settings.home == (tmp_path / "env-home").resolve()
    assert settings.lake_dir == settings.home / "lake"
    assert settings.models_dir == settings.home / "models"
    assert settings.data.logs == [] and settings.data.labels is None  # the demo's are in demo.toml
    assert settings.data.heldout_fraction == 0.2
    assert settings.data.max_prompts is None
    assert settings.model.base == "embedded"
    assert settings.generation.num_samples == 8
    assert settings.generation.temperature == 0.8
    assert settings.training.use_lora is True
    assert settings.training.max_steps is None
    assert settings.pairs.min_margin == 0.25
    assert settings.evaluation.min_win_rate == 0.5
    assert settings.scoring.scorers == {"default": {"self_consistency": 1.0}}
    assert settings.scoring.extractors["arithmetic"] == "last_number"
    # Lengths for a real instruction model, not the demo's 32 tokens.
    assert settings.generation.max_new_tokens == 512 and settings.evaluation.max_new_tokens == 512
    assert settings.training.max_length == 1024 and settings.training.grpo.max_completion_length == 256


def test_the_demo_config_is_the_old_defaults_and_the_bundled_data():
    demo = load_settings(DEMO_CONFIG)
    assert demo.data.logs == [DEMO_LOGS] and demo.data.labels == DEMO_LABELS
    assert demo.generation.max_new_tokens == 32 and demo.evaluation.max_new_tokens == 32
    assert demo.training.max_length == 256 and demo.training.grpo.max_completion_length == 32
    assert demo.scoring.scorers["short_answer"] == {"self_consistency": 1.0, "concise_format": 0.25}
    assert demo.scoring.extractors["default"] == "short_phrase"


def test_default_home_is_expanded_when_tao_home_unset(monkeypatch):
    # The default "~/.tao" must be expanded like a configured home, or the lake lands in ./~/.tao.
    monkeypatch.delenv("TAO_HOME")
    home = load_settings().home
    assert home.is_absolute()
    assert home == (Path.home() / ".tao").resolve()


def test_home_with_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert TaoSettings(home="~/somewhere").home == (tmp_path / "somewhere").resolve()


def test_assignment_is_validated():
    settings = TaoSettings()
    with pytest.raises(ValidationError):
        settings.generation.num_samples = 0
    settings.generation.num_samples = 3
    assert settings.generation.num_samples == 3


# -- TOML files -------------------------------------------------------------------------


def test_values_come_from_the_toml_file(tmp_path):
    config = write_config(
        tmp_path / "cfg" / "tao.toml",
        """
[generation]
num_samples = 4
temperature = 0.5

[training]
use_lora = false
max_steps = 7

[scoring.scorers.default]
self_consistency = 1.0
concise_format = 0.5
""",
    )
    settings = load_settings(config)
    assert settings.generation.num_samples == 4
    assert settings.generation.temperature == 0.5
    assert settings.generation.max_new_tokens == 512  # untouched default
    assert settings.training.use_lora is False
    assert settings.training.max_steps == 7
    assert settings.scoring.scorers == {"default": {"self_consistency": 1.0, "concise_format": 0.5}}


def test_tao_config_variable_and_local_tao_toml(tmp_path, monkeypatch):
    write_config(Path.cwd() / "tao.toml", "[generation]\nnum_samples = 5\n")
    assert load_settings().generation.num_samples == 5
    explicit = write_config(tmp_path / "other.toml", "[generation]\nnum_samples = 6\n")
    monkeypatch.setenv("TAO_CONFIG", str(explicit))
    assert load_settings().generation.num_samples == 6


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    folder = tmp_path / "project"
    config = write_config(
        folder / "tao.toml",
        """
home = "state"

[data]
logs = ["logs/a.jsonl", "b.jsonl"]
labels = "labels/l.jsonl"

[model]
base = "./models/base"
""",
    )
    for name in ("logs/a.jsonl", "b.jsonl", "labels/l.jsonl"):  # named files must exist when settings load
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    settings = load_settings(config)  # cwd is a different folder
    assert Path.cwd() != folder
    assert settings.home == (folder / "state").resolve()
    assert [Path(p) for p in settings.data.logs] == [folder / "logs" / "a.jsonl", folder / "b.jsonl"]
    assert settings.data.labels == folder / "labels" / "l.jsonl"
    assert Path(settings.model.base) == folder / "models" / "base"


def test_absolute_paths_and_hub_ids_are_kept(tmp_path):
    logs = tmp_path / "elsewhere" / "logs.jsonl"
    config = write_config(
        tmp_path / "project" / "tao.toml",
        f"""
home = "{tmp_path / "abs-home"}"
[data]
logs = ["{logs}"]
[model]
base = "HuggingFaceTB/SmolLM2-135M-Instruct"
""",
    )
    logs.parent.mkdir(parents=True)
    logs.write_text("")
    settings = load_settings(config)
    assert settings.home == (tmp_path / "abs-home").resolve()
    assert settings.data.logs == [logs]
    assert settings.model.base == "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- overrides --------------------------------------------------------------------------


def test_overrides_beat_the_file(tmp_path):
    config = write_config(tmp_path / "tao.toml", "[generation]\nnum_samples = 4\nseed = 3\n")
    settings = load_settings(config, ["generation.num_samples=2", "training.bf16=false", "model.dtype=float32"])
    assert settings.generation.num_samples == 2
    assert settings.generation.seed == 3  # file value kept
    assert settings.training.bf16 is False
    assert settings.model.dtype == "float32"  # bare string, no quotes needed


def test_overrides_without_a_file():
    settings = load_settings(None, ["data.max_prompts=10", "pairs.min_margin=0.5", "data.split_salt='x y'"])
    assert settings.data.max_prompts == 10
    assert settings.pairs.min_margin == 0.5
    assert settings.data.split_salt == "x y"


@pytest.mark.parametrize(
    "item, expected",
    [
        ("training.max_steps=3", (["training", "max_steps"], 3)),
        ("evaluation.min_win_rate = 0.6", (["evaluation", "min_win_rate"], 0.6)),
        ("training.use_lora=true", (["training", "use_lora"], True)),
        ("model.base=some/model", (["model", "base"], "some/model")),
        ("data.logs=['a.jsonl', 'b.jsonl']", (["data", "logs"], ["a.jsonl", "b.jsonl"])),
    ],
)
def test_parse_override(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["generation.num_samples", "=3", "  =3"])
def test_malformed_override(item):
    with pytest.raises(SettingsError, match="section.name=value"):
        load_settings(None, [item])


def test_override_below_a_scalar_names_the_setting(tmp_path):
    config = write_config(tmp_path / "tao.toml", "[generation]\nnum_samples = 4\n")
    with pytest.raises(SettingsError, match=r"generation\.num_samples"):
        load_settings(config, ["generation.num_samples.x=1"])


# -- errors name the setting ------------------------------------------------------------


def test_unknown_key_in_file(tmp_path):
    config = write_config(tmp_path / "tao.toml", "[generation]\nnum_sample = 4\n")
    with pytest.raises(SettingsError, match=r"'generation\.num_sample'"):
        load_settings(config)


def test_unknown_section_override():
    with pytest.raises(SettingsError, match=r"'generaton'"):
        load_settings(None, ["generaton.num_samples=4"])


@pytest.mark.parametrize(
    "override, name",
    [
        ("generation.num_samples=0", "generation.num_samples"),
        ("generation.num_samples=65", "generation.num_samples"),
        ("generation.temperature=0", "generation.temperature"),
        ("data.heldout_fraction=1.0", "data.heldout_fraction"),
        ("evaluation.min_win_rate=1.5", "evaluation.min_win_rate"),
        ("pairs.min_margin=7", "pairs.min_margin"),
        ("scoring.min_agreement=-0.5", "scoring.min_agreement"),
        ("training.lora_dropout=-0.1", "training.lora_dropout"),
        ("model.dtype=float16", "model.dtype"),
        ("generation.backend=tpu", "generation.backend"),
        ("training.max_steps=many", "training.max_steps"),
    ],
)
def test_out_of_range_value_names_the_setting(override, name):
    with pytest.raises(SettingsError) as info:
        load_settings(None, [override])
    assert f"'{name}'" in str(info.value)


def test_unknown_scorer_is_named(tmp_path):
    config = write_config(
        tmp_path / "tao.toml",
        """
[scoring.scorers.default]
self_consistency = 1.0
[scoring.scorers.arithmetic]
telepathy = 1.0
""",
    )
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    message = str(info.value)
    assert "scoring.scorers.arithmetic" in message
    assert "telepathy" in message


def test_unknown_extractor_is_named():
    with pytest.raises(SettingsError) as info:
        load_settings(None, ["scoring.extractors={default='short_phrase', arithmetic='magic'}"])
    assert "scoring.extractors.arithmetic" in str(info.value)
    assert "magic" in str(info.value)


def test_a_config_naming_its_own_tasks_keeps_the_built_in_ones(tmp_path):
    config = write_config(
        tmp_path / "tao.toml",
        """
[scoring.scorers.mytask]
self_consistency = 1.0
length_limit = 0.5
[scoring.extractors]
mytask = "boxed"
""",
    )
    scoring = load_settings(config).scoring
    assert scoring.scorers == {
        "default": {"self_consistency": 1.0},
        "mytask": {"self_consistency": 1.0, "length_limit": 0.5},
    }
    assert scoring.extractors["mytask"] == "boxed" and scoring.extractors["default"] == "final_line"
    assert load_settings(None, ["scoring.scorers={arithmetic={self_consistency=1.0}}"]).scoring.scorers["default"]


def test_negative_weight():
    with pytest.raises(SettingsError, match=r"scoring\.scorers\.default\.self_consistency: weight"):
        load_settings(None, ["scoring.scorers.default.self_consistency=-1"])


def test_scoring_section_validates_directly():
    with pytest.raises(ValidationError, match="unknown scorer 'nope'"):
        ScoringSettings(scorers={"default": {"nope": 1.0}})
    assert ScoringSettings(extractors={"default": "first_line_number"}).extractors["default"] == "first_line_number"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="does not exist") as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_missing_tao_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TAO_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(SettingsError, match="gone.toml"):
        load_settings()


def test_invalid_toml(tmp_path):
    config = write_config(tmp_path / "broken.toml", "[generation\nnum_samples = 4\n")
    with pytest.raises(SettingsError, match="not valid TOML") as info:
        load_settings(config)
    assert "broken.toml" in str(info.value)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)
    with pytest.raises(ValueError):
        load_settings(None, ["data.max_heldout=0"])


def test_section_classes_compose():
    settings = TaoSettings(data=DataSettings(heldout_fraction=0.5), generation=GenerationSettings(num_samples=2))
    assert settings.data.heldout_fraction == 0.5
    assert settings.generation.num_samples == 2
    with pytest.raises(ValidationError):
        DataSettings(unknown=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["flywheel.round_run_tags={ 'dagster/max_retries' = '9' }"], "set by tao itself"),
        (["flywheel.round_run_tags={ 'tao/orphaned' = 'no' }"], "set by tao itself"),
        (["flywheel.round_run_tags={ when = 1979-05-27 }"], "a string or a table, not date"),
        (["storage.platform_instance=true", "storage.postgres_url_env='DB_URL'"], "unset postgres_url_env"),
    ],
)
def test_deployment_settings_that_cannot_work_are_refused_naming_why(overrides, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(None, overrides)


def test_the_platform_instance_is_dagster_home_as_the_platform_set_it(monkeypatch, tmp_path):
    settings = load_settings(None, ["storage.platform_instance=true"])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "chart"))
    assert settings.dagster_home == tmp_path / "chart"
    assert load_settings(None, []).dagster_home == tmp_path / "env-home" / "dagster"

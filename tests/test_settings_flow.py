"""Settings flow one way: a file plus overrides, loaded once per run or tick, by the CLI, the launchpad,
the sensors and the schedule alike."""

import json

import dagster as dg
import pytest
from click.testing import CliRunner

from tao_pipeline.cli import commands
from tao_pipeline.cli.runner import code_location, run_config
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.resources import TaoSettingsResource
from tao_pipeline.settings import OVERRIDES_ENV, SettingsError, SettingsSource, load_settings
from tests.helpers import sample_logs, write_logs


def write_home_config(folder, **flywheel) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{key} = {value}\n" for key, value in flywheel.items())
    config = folder / "tao.toml"
    config.write_text(f'home = "{folder / "home"}"\n[data]\nlogs = []\n[flywheel]\n{lines}')
    return str(config)


def test_a_runs_settings_reach_the_lake_and_the_model_store(tmp_path, monkeypatch):
    """The code location's resources default to the environment's source (home B here); a run given
    another source in run config (home A, as `tao round` and the launchpad do) writes only to A."""
    monkeypatch.setenv("TAO_CONFIG", write_home_config(tmp_path / "b"))
    config_a = write_home_config(tmp_path / "a")
    settings_a = load_settings(config_a)
    log = write_logs(tmp_path / "logs.jsonl", sample_logs(6))
    job = code_location().resolve_job_def("ingest_usage_logs")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("log_batches", ["logs-1"])
        ops = {"usage_logs": {"config": {"path": str(log)}}}
        result = job.execute_in_process(
            instance=instance, partition_key="logs-1", run_config=run_config(SettingsSource(config_a), ops=ops)
        )
    assert result.success
    assert Lake(settings_a.lake_dir).partitions("usage_logs") == ["logs-1"]
    assert not (tmp_path / "b" / "home").exists()


def test_settings_are_loaded_once_per_run(tmp_path, monkeypatch):
    config = write_home_config(tmp_path / "a")
    log = write_logs(tmp_path / "logs.jsonl", sample_logs(6))
    job = code_location().resolve_job_def("ingest_usage_logs")
    loads = []
    original = SettingsSource.load
    monkeypatch.setattr(SettingsSource, "load", lambda self: loads.append(self) or original(self))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("log_batches", ["logs-1"])
        ops = {"usage_logs": {"config": {"path": str(log)}}}
        assert job.execute_in_process(
            instance=instance, partition_key="logs-1", run_config=run_config(SettingsSource(config), ops=ops)
        ).success
    assert loads == [SettingsSource(config, ())]  # the settings, lake and the asset share one load


def test_the_environment_source_reaches_the_code_location_its_sensors_and_the_schedule(tmp_path, monkeypatch):
    """What `tao ui --config F --set K=V` hands to `dagster dev`: the tick interval, the cron and every
    sensor tick follow it."""
    config = write_home_config(tmp_path / "a", min_new_prompts=10)
    overrides = ["flywheel.sensor_interval_s=7", "flywheel.schedule_cron='0 4 * * *'", "flywheel.min_new_prompts=3"]
    for name, value in SettingsSource(config, tuple(overrides)).environment().items():
        monkeypatch.setenv(name, value)
    definitions = code_location()
    assert {sensor.minimum_interval_seconds for sensor in definitions.sensors} == {7}
    assert [schedule.cron_schedule for schedule in definitions.schedules] == ["0 4 * * *"]
    resource = definitions.resources["settings"]
    settings = SettingsSource.from_environment().load()
    assert settings.flywheel.min_new_prompts == 3 and settings.home == load_settings(config).home
    # A round sensor tick with the code location's own resource: 5 new prompts open a round at 3, not 10.
    write_logs(tmp_path / "logs.jsonl", sample_logs(5))
    with dg.instance_for_test() as instance:
        ingest = definitions.resolve_job_def("ingest_usage_logs")
        instance.add_dynamic_partitions("log_batches", ["logs-1"])
        ops = {"usage_logs": {"config": {"path": str(tmp_path / "logs.jsonl")}}}
        assert ingest.execute_in_process(instance=instance, partition_key="logs-1", run_config={"ops": ops}).success
        round_sensor = definitions.resolve_sensor_def("new_prompts_round_sensor")
        with dg.build_sensor_context(instance=instance, resources={"settings": resource}) as context:
            result = round_sensor(context)
    assert isinstance(result, dg.SensorResult), result
    assert [request.partition_key for request in result.run_requests] == ["round-0001"]


def test_tao_ui_hands_its_config_and_overrides_to_dagster_dev(tmp_path, monkeypatch):
    config = write_home_config(tmp_path / "a")
    calls = []
    monkeypatch.setattr(commands, "run_tied_to_this_process", lambda command, env: calls.append((command, env)) or 0)
    result = CliRunner().invoke(
        commands.main, ["ui", "--config", config, "--set", "flywheel.min_new_prompts=3", "--port", "3999"]
    )
    assert result.exit_code == 0, result.output
    [(command, env)] = calls
    assert command[-6:] == ["-m", "tao_pipeline.definitions", "-h", "127.0.0.1", "-p", "3999"]
    assert env["TAO_CONFIG"] == str((tmp_path / "a" / "tao.toml").resolve())
    assert json.loads(env[OVERRIDES_ENV]) == ["flywheel.min_new_prompts=3"]
    assert env["DAGSTER_HOME"] == str(load_settings(config).dagster_home)


def test_tao_ui_refuses_a_bad_override_before_starting_anything(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(commands, "run_tied_to_this_process", lambda *args, **kwargs: calls.append(args) or 0)
    result = CliRunner().invoke(commands.main, ["ui", "--set", "flywheel.min_new_prompts=0"])
    assert result.exit_code != 0 and "flywheel.min_new_prompts" in result.output and not calls


@pytest.mark.parametrize("raw", ["not json", '{"a": 1}', "[1, 2]"])
def test_a_malformed_overrides_variable_is_named(raw, monkeypatch):
    monkeypatch.setenv(OVERRIDES_ENV, raw)
    with pytest.raises(SettingsError, match=OVERRIDES_ENV):
        SettingsSource.from_environment()


def test_a_resource_outside_a_run_loads_fresh_settings_each_time(tmp_path):
    config = tmp_path / "tao.toml"
    config.write_text("[generation]\nnum_samples = 3\n")
    resource = TaoSettingsResource(config_file=str(config))
    assert resource.get().generation.num_samples == 3
    config.write_text("[generation]\nnum_samples = 5\n")
    assert resource.get().generation.num_samples == 5  # nothing cached between ticks or runs

"""The production layout's Dagster instance: Postgres (dagster-postgres), named by `storage.postgres_url_env`.

A real PostgreSQL server per module (tests/postgres.py: initdb into a temporary folder, a unix socket). `tao
round`, the sensors and their runs share the one instance the settings name; the password-carrying URL is read
from the environment by Dagster and never written. tests/test_flywheel_live.py runs the live flywheel (serve,
daemon killed mid-round, retries) against it too.
"""

import json
import os

import dagster as dg
import pytest

from tao_pipeline.cli.instance import InstanceConfigError, prepare_dagster_home
from tao_pipeline.cli.runner import ingest_new_files, run_round
from tao_pipeline.defs.sensors import build_round_sensor, build_usage_log_sensor
from tao_pipeline.settings import SettingsSource, load_settings
from tests.helpers import sample_logs, write_flywheel_config, write_logs
from tests.postgres import running_postgres

URL_ENV = "TAO_TEST_POSTGRES_URL"
POSTGRES = f"storage.postgres_url_env='{URL_ENV}'"


@pytest.fixture(scope="module")
def postgres_url():
    with running_postgres() as url:
        yield url


@pytest.fixture
def on_postgres(postgres_url, monkeypatch):
    monkeypatch.setenv(URL_ENV, postgres_url)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # restored afterwards; prepare_dagster_home sets it
    return postgres_url


def _wipe(instance: dg.DagsterInstance) -> None:
    """Each test starts from an empty database (the server is shared by the module's tests)."""
    instance.wipe()
    for name in instance.get_dynamic_partitions("rounds"):
        instance.delete_dynamic_partition("rounds", name)
    for name in instance.get_dynamic_partitions("log_batches"):
        instance.delete_dynamic_partition("log_batches", name)


def test_a_round_runs_on_the_postgres_instance_and_nothing_lands_in_sqlite(tiny_config, on_postgres):
    settings = load_settings(tiny_config, [POSTGRES])
    home = prepare_dagster_home(settings)
    text = (home / "dagster.yaml").read_text()
    assert "postgres_url" in text and on_postgres not in text  # Dagster reads the URL from the environment
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        _wipe(instance)
    report = run_round(str(tiny_config), [POSTGRES], echo=lambda *_: None)
    assert report.completed, report.failure
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs(dg.RunsFilter(job_name="tao_round"))  # promoted or refused: one run, in Postgres
        assert run.tags["dagster/partition"] == report.round_id
        assert instance.get_dynamic_partitions("rounds") == [report.round_id]
        for stage in ("raw_prompts", "candidate_responses", "preference_pairs", "tuned_checkpoint"):
            assert instance.get_latest_materialization_event(dg.AssetKey(stage)) is not None, stage
    assert not list(home.glob("**/*.db")), "no SQLite storage beside the Postgres instance"


def test_the_sensors_tick_against_postgres(tmp_path, tiny_model_dir, on_postgres, monkeypatch):
    storage = f'[storage]\npostgres_url_env = "{URL_ENV}"\n'
    config = write_flywheel_config(tmp_path, tiny_model_dir, min_new_prompts=6, extra=storage)
    monkeypatch.setenv("TAO_CONFIG", str(config))
    settings = load_settings()
    prepare_dagster_home(settings)
    settings.inbox_dir.mkdir(parents=True)
    write_logs(settings.inbox_dir / "monday.jsonl", sample_logs(8))
    from tao_pipeline.defs.resources import TaoSettingsResource

    def tick(sensor, instance):
        with dg.build_sensor_context(instance=instance, resources={"settings": TaoSettingsResource()}) as context:
            return sensor(context)

    with dg.DagsterInstance.get() as instance:
        _wipe(instance)
        requested = tick(build_usage_log_sensor(30), instance)
        assert isinstance(requested, dg.SensorResult) and len(requested.run_requests) == 1
        ingested = ingest_new_files(instance, settings, SettingsSource(str(config), ()), lambda *_: None)
        assert len(ingested) == 1
        assert instance.get_dynamic_partitions("log_batches")  # stored in Postgres
        opened = tick(build_round_sensor(30), instance)
        assert isinstance(opened, dg.SensorResult) and [r.partition_key for r in opened.run_requests] == ["round-0001"]


def test_a_missing_or_wrong_url_is_one_line_naming_the_variable(tiny_config, monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    settings = load_settings(tiny_config, [POSTGRES])
    with pytest.raises(InstanceConfigError, match=rf"storage.postgres_url_env='{URL_ENV}': \${URL_ENV} is not set"):
        prepare_dagster_home(settings)
    monkeypatch.setenv(URL_ENV, "mysql://nope")
    with pytest.raises(InstanceConfigError, match="does not hold a postgresql:// URL"):
        prepare_dagster_home(settings)


def test_doctor_checks_the_postgres_instance_without_showing_its_url(tiny_config, on_postgres, monkeypatch, tmp_path):
    from tao_pipeline.cli.doctor import diagnose

    settings = load_settings(tiny_config, [POSTGRES])
    prepare_dagster_home(settings)
    [finding] = [f for f in diagnose(settings) if f.area == "dagster"]
    assert finding.ok and f"Postgres (${URL_ENV}), run monitoring and retries on" in finding.detail

    down = f"postgresql://tao:s3cret-pw@/tao?host={tmp_path}"  # no server listens there
    monkeypatch.setenv(URL_ENV, down)
    [finding] = [f for f in diagnose(settings) if f.area == "dagster"]
    assert not finding.ok and finding.detail.startswith(f"Postgres at ${URL_ENV}: ")
    assert "s3cret-pw" not in finding.detail and "\n" not in finding.detail


def test_a_round_runs_on_the_platform_s_instance_untouched_with_its_run_tags(tiny_config, on_postgres, tmp_path):
    """Under the Dagster Helm chart: the chart's dagster.yaml (Postgres) at $DAGSTER_HOME, storage.platform_instance,
    and the round's run tags from the settings (a GPU for the run's pod)."""
    platform = tmp_path / "chart-instance"
    platform.mkdir()
    theirs = f"storage:\n  postgres:\n    postgres_url:\n      env: {URL_ENV}\ntelemetry:\n  enabled: false\n"
    (platform / "dagster.yaml").write_text(theirs)
    gpu = "{ container_config = { resources = { limits = { 'nvidia.com/gpu' = '1' } } } }"
    overrides = ["storage.platform_instance=true", f"flywheel.round_run_tags={{ 'dagster-k8s/config' = {gpu} }}"]
    os.environ["DAGSTER_HOME"] = str(platform)  # as the chart sets it in the pod (on_postgres restores it)
    settings = load_settings(tiny_config, overrides)
    assert prepare_dagster_home(settings) == platform
    with dg.DagsterInstance.get() as instance:
        _wipe(instance)
    report = run_round(str(tiny_config), overrides, echo=lambda *_: None)
    assert report.completed, report.failure
    assert (platform / "dagster.yaml").read_text() == theirs and not (settings.home / "dagster").exists()
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs(dg.RunsFilter(job_name="tao_round"))
        resources = json.loads(run.tags["dagster-k8s/config"])["container_config"]["resources"]
        assert resources == {"limits": {"nvidia.com/gpu": "1"}}
    assert not list(platform.glob("**/*.db")), "the round's runs went to the platform's Postgres"

"""The flywheel's automation on a real ephemeral Dagster instance: ingestion sensor, round sensor, schedule."""

import json
import os
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from tao_pipeline.cli.runner import code_location
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.assets.prompts import raw_prompts
from tao_pipeline.defs.constants import INGEST_JOB
from tao_pipeline.defs.orphans import RANGE_END_TAG, RANGE_START_TAG
from tao_pipeline.defs.resources import TaoSettingsResource, build_resources
from tao_pipeline.defs.schedules import build_periodic_round_schedule
from tao_pipeline.defs.sensors import build_round_sensor, build_usage_log_sensor
from tao_pipeline.settings import load_settings
from tests.helpers import sample_logs, write_flywheel_config, write_logs

usage_log_sensor = build_usage_log_sensor(interval_s=30)
new_prompts_round_sensor = build_round_sensor(interval_s=30)
periodic_round_schedule = build_periodic_round_schedule("0 3 * * 1")


def tick(definition: dg.SensorDefinition | dg.ScheduleDefinition, **context):
    """One evaluation of a sensor or the schedule, with the resource the code location gives them
    (settings from $TAO_CONFIG); the context is closed after the tick, as the daemon closes it."""
    build = dg.build_schedule_context if isinstance(definition, dg.ScheduleDefinition) else dg.build_sensor_context
    with build(resources={"settings": TaoSettingsResource()}, **context) as evaluation:
        return definition(evaluation)


@pytest.fixture
def flywheel(tmp_path, monkeypatch, tiny_model_dir):
    """An isolated home with an inbox, a round threshold of 10 prompts and no static log files."""
    config = write_flywheel_config(tmp_path, tiny_model_dir, min_new_prompts=10)
    monkeypatch.setenv("TAO_CONFIG", str(config))
    settings = load_settings()
    settings.inbox_dir.mkdir(parents=True)
    with dg.instance_for_test() as instance:
        yield settings, instance


def ingest(instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """The run a request asks for, of the code location's ingest job: one partition, or a range of them."""
    return (
        code_location()
        .resolve_job_def(INGEST_JOB)
        .execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
            raise_on_error=False,
        )
    )


def queued(instance, request: dg.RunRequest) -> None:
    """The request's run, created and not started yet, as when the ingest slots are taken."""
    from dagster._core.storage.dagster_run import DagsterRun

    tags = {**request.tags, **({"dagster/partition": request.partition_key} if request.partition_key else {})}
    status = dg.DagsterRunStatus.NOT_STARTED
    instance.add_run(DagsterRun(job_name="ingest_usage_logs", run_id=str(uuid.uuid4()), status=status, tags=tags))


def apply(instance, result: dg.SensorResult) -> None:
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_ingestion_sensor_requests_each_new_file_exactly_once(flywheel):
    settings, instance = flywheel
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)

    write_logs(settings.inbox_dir / "monday.jsonl", sample_logs(6))
    write_logs(settings.inbox_dir / "tuesday.jsonl", sample_logs(12)[6:])
    result = tick(usage_log_sensor, instance=instance)
    assert isinstance(result, dg.SensorResult)
    [request] = result.run_requests  # one run, a partition per file: the range of the two
    keys = list(result.dynamic_partitions_requests[0].partition_keys)
    assert {k.split("-")[0] for k in keys} == {"monday", "tuesday"}
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (keys[0], keys[-1])
    assert set(request.run_config["ops"]["usage_logs"]["config"]["paths"]) == set(keys)

    apply(instance, result)  # the tick's partitions exist now, and its run waits in the queue, as after a real tick
    queued(instance, request)
    again = tick(usage_log_sensor, instance=instance, cursor=result.cursor)
    assert isinstance(again, dg.SkipReason)
    (settings.inbox_dir / "monday-copy.jsonl").write_bytes((settings.inbox_dir / "monday.jsonl").read_bytes())
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)

    run = ingest(instance, request)
    assert run.success and instance.get_materialized_partitions(dg.AssetKey("usage_logs")) == set(keys)
    assert len(pd.read_parquet(settings.lake_dir / "usage_logs" / f"{keys[0]}.parquet")) == 6
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)  # committed, the copy too


def keys_of(request: dg.RunRequest) -> list[str]:
    config = request.run_config["ops"]["usage_logs"]["config"]
    return [request.partition_key] if request.partition_key else list(config["paths"])


def test_files_arriving_while_the_ingest_slots_are_taken_wait_and_then_go_in_few_runs(flywheel):
    """flywheel.max_concurrent_ingest_runs (2) runs in flight: new files wait. Once the slots free up, the file
    whose run failed and the new ones go in ranges of consecutive partitions, at most 3 files a run here."""
    settings, instance = flywheel
    config = Path(os.environ["TAO_CONFIG"])
    config.write_text(config.read_text().replace("[flywheel]\n", "[flywheel]\nmax_files_per_ingest_run = 3\n"))
    days, rows = ("mon", "tue", "wed", "thu", "fri", "sat", "sun"), sample_logs(14)
    logs = {day: rows[2 * i : 2 * i + 2] for i, day in enumerate(days)}  # different files: a copy is not new
    first = {}
    for day in ("mon", "tue"):
        write_logs(settings.inbox_dir / f"{day}.jsonl", logs[day])
        result = tick(usage_log_sensor, instance=instance)
        apply(instance, result)
        [first[day]] = result.run_requests
        queued(instance, first[day])
    for day in days[2:]:
        write_logs(settings.inbox_dir / f"{day}.jsonl", logs[day])
    waiting = tick(usage_log_sensor, instance=instance)
    assert isinstance(waiting, dg.SkipReason) and "5 log file(s) ready wait for one of the 2" in waiting.skip_message

    for run in instance.get_runs():  # monday's run ingests its file; tuesday's fails
        if run.tags["dagster/partition"].startswith("mon"):
            instance.delete_run(run.run_id)
            assert ingest(instance, first["mon"]).success
        else:
            instance.report_run_failed(run)
    result = tick(usage_log_sensor, instance=instance)
    requested = [[key.split("-")[0] for key in keys_of(request)] for request in result.run_requests]
    assert requested == [["tue", "fri", "sat"], ["sun", "thu", "wed"]]  # partitions in the order they were added
    apply(instance, result)
    assert all(ingest(instance, request).success for request in result.run_requests)
    assert len(instance.get_materialized_partitions(dg.AssetKey("usage_logs"))) == 7
    assert len(Lake(settings.lake_dir).query("SELECT * FROM usage_logs")) == 14
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)


def test_a_file_that_fails_in_a_run_of_several_is_retried_alone_and_the_others_are_in(flywheel, monkeypatch):
    settings, instance = flywheel
    for i, day in enumerate(("mon", "tue", "wed")):
        write_logs(settings.inbox_dir / f"{day}.jsonl", sample_logs(9)[3 * i : 3 * i + 3])
    from tao_pipeline.data.ingest import batch as batch_module

    real = batch_module.ingest_to_lake

    def full_on_tuesday(path, *args, **kwargs):
        if path.name == "tue.jsonl":
            raise OSError("No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(batch_module, "ingest_to_lake", full_on_tuesday)
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    [request] = result.run_requests
    run = ingest(instance, request)
    assert not run.success
    failure = next(event for event in run.all_events if event.is_step_failure)
    assert "1 of 3 log files failed and will be retried: tue-" in str(failure.event_specific_data.error)
    assert "(tue.jsonl): OSError: No space left on device" in str(failure.event_specific_data.error)
    done = instance.get_materialized_partitions(dg.AssetKey("usage_logs"))
    assert sorted(key.split("-")[0] for key in done) == ["mon", "wed"]  # committed, and shown so
    assert (settings.inbox_dir / "tue.jsonl").exists() and not (settings.inbox_dir / "mon.jsonl").exists()

    monkeypatch.setattr(batch_module, "ingest_to_lake", real)
    retry = tick(usage_log_sensor, instance=instance)
    [again] = retry.run_requests
    assert again.partition_key.startswith("tue-") and not retry.dynamic_partitions_requests
    assert ingest(instance, again).success
    assert len(Lake(settings.lake_dir).query("SELECT * FROM usage_logs")) == 9


def test_ingestion_quarantines_bad_rows_and_archives_the_file(flywheel):
    settings, instance = flywheel
    write_logs(
        settings.inbox_dir / "mixed.jsonl",
        sample_logs(4) + ["{broken", {"prompt": 42}, {"prompt": "  "}, {"task": "arithmetic"}],
    )
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    [request] = result.run_requests
    assert ingest(instance, request).success
    lake = settings.lake_dir
    rows = pd.read_parquet(lake / "usage_logs" / f"{request.partition_key}.parquet")
    quarantine = pd.read_parquet(lake / "quarantined_rows" / f"{request.partition_key}.parquet")
    assert len(rows) == 4 and rows["log_id"].is_unique
    assert sorted(quarantine["reason"].str.split(":").str[0]) == [
        "field 'prompt' must be a string, got int",
        "missing required field 'prompt' (or 'messages', as in an OpenAI chat request)",
        "not valid JSON",
        "prompt is empty",
    ]
    assert not (settings.inbox_dir / "mixed.jsonl").exists()
    assert (settings.inbox_dir / "processed" / "mixed.jsonl").exists()


def test_an_unreadable_file_is_reported_once_not_retried(flywheel):
    settings, instance = flywheel
    (settings.inbox_dir / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    [request] = result.run_requests
    assert ingest(instance, request).success
    quarantine = pd.read_parquet(settings.lake_dir / "quarantined_rows" / f"{request.partition_key}.parquet")
    assert "not a readable Parquet file" in quarantine["reason"].iloc[0]
    assert (settings.inbox_dir / "failed" / "corrupt.parquet").exists()
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)


def test_an_unreadable_configured_file_is_quarantined_once_and_left_alone(flywheel, tmp_path):
    """A data.logs file stays where it is; its run succeeds (the file quarantined with the reason), so later
    ticks do not read it again although none of its rows are in the lake."""
    settings, instance = flywheel
    corrupt = tmp_path / "exports" / "broken.parquet"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"PAR1 this is not parquet")
    config = Path(os.environ["TAO_CONFIG"])
    config.write_text(config.read_text().replace("logs = []", f"logs = ['{corrupt}']"))
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    [request] = result.run_requests
    assert ingest(instance, request).success and corrupt.exists()
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)


def test_parquet_and_csv_logs_are_ingested(flywheel):
    settings, instance = flywheel
    pd.DataFrame(sample_logs(5)).to_parquet(settings.inbox_dir / "app.parquet")
    pd.DataFrame(sample_logs(3)).to_csv(settings.inbox_dir / "app.csv", index=False)
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    counts = {}
    for request in result.run_requests:
        assert ingest(instance, request).success
        for key in keys_of(request):
            counts[key] = len(pd.read_parquet(settings.lake_dir / "usage_logs" / f"{key}.parquet"))
    assert sorted(counts.values()) == [3, 5]  # app.parquet and app.csv: two batches, each its own partition


def ingest_all(instance) -> None:
    result = tick(usage_log_sensor, instance=instance)
    apply(instance, result)
    for request in result.run_requests:
        assert ingest(instance, request).success


def take_prompts(instance, round_id: str) -> None:
    assert dg.materialize([raw_prompts], partition_key=round_id, instance=instance, resources=build_resources()).success


def test_round_sensor_opens_one_round_per_threshold_exactly_once(flywheel):
    settings, instance = flywheel
    write_logs(settings.inbox_dir / "few.jsonl", sample_logs(6))
    ingest_all(instance)
    below = tick(new_prompts_round_sensor, instance=instance)
    assert isinstance(below, dg.SkipReason) and "6 unused prompts" in below.skip_message

    write_logs(
        settings.inbox_dir / "more.jsonl",
        [{"prompt": f"Spell the number {i}.", "task": "short_answer"} for i in range(6)],
    )
    ingest_all(instance)
    opened = tick(new_prompts_round_sensor, instance=instance)
    assert isinstance(opened, dg.SensorResult)
    [request] = opened.run_requests
    assert request.partition_key == request.run_key == "round-0001"
    apply(instance, opened)

    # Re-evaluated before the round took its prompts: no second round for the same prompts.
    waiting = tick(new_prompts_round_sensor, instance=instance, cursor=opened.cursor)
    assert isinstance(waiting, dg.SkipReason) and "round-0001" in waiting.skip_message

    take_prompts(instance, "round-0001")
    taken = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0001.parquet")
    assert len(taken) == 12  # nothing lost: every ingested prompt is in the round
    assert isinstance(tick(new_prompts_round_sensor, instance=instance), dg.SkipReason)

    write_logs(
        settings.inbox_dir / "next.jsonl",
        [
            {"prompt": f"Name a word rhyming with {w}.", "task": "short_answer"}
            for w in "cat dog sun sky bee car pen hat map cup".split()
        ],
    )
    ingest_all(instance)
    second = tick(new_prompts_round_sensor, instance=instance)
    assert second.run_requests[0].partition_key == "round-0002"
    apply(instance, second)
    take_prompts(instance, "round-0002")
    again = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0002.parquet")
    assert len(again) == 10 and not set(again["prompt_id"]) & set(taken["prompt_id"])


def test_rematerializing_a_round_takes_the_same_prompts(flywheel):
    settings, instance = flywheel
    write_logs(settings.inbox_dir / "logs.jsonl", sample_logs(12))
    ingest_all(instance)
    instance.add_dynamic_partitions("rounds", ["round-0001"])
    take_prompts(instance, "round-0001")
    first = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0001.parquet")
    take_prompts(instance, "round-0001")
    second = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0001.parquet")
    assert first["prompt_id"].tolist() == second["prompt_id"].tolist()


def test_schedule_opens_a_round_only_when_something_is_new(flywheel):
    settings, instance = flywheel
    skipped = tick(periodic_round_schedule, instance=instance)
    assert isinstance(skipped, dg.SkipReason)

    write_logs(settings.inbox_dir / "one.jsonl", [{"prompt": "What is 1 + 1?", "task": "arithmetic"}])
    ingest_all(instance)
    request = tick(periodic_round_schedule, instance=instance)
    assert isinstance(request, dg.RunRequest) and request.partition_key == "round-0001"
    assert "round-0001" in instance.get_dynamic_partitions("rounds")


def test_unused_constraints_column_is_carried_to_the_round(flywheel):
    settings, instance = flywheel
    rows = [{"prompt": f"List {i} fruits.", "task": "list", "constraints": {"bullets": i}} for i in range(1, 11)]
    write_logs(settings.inbox_dir / "constrained.jsonl", rows)
    ingest_all(instance)
    instance.add_dynamic_partitions("rounds", ["round-0001"])
    take_prompts(instance, "round-0001")
    prompts = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0001.parquet")
    assert sorted(json.loads(c)["bullets"] for c in prompts["constraints"]) == list(range(1, 11))


def test_no_new_round_while_one_is_running(flywheel):
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

    settings, instance = flywheel
    write_logs(settings.inbox_dir / "logs.jsonl", sample_logs(12))
    ingest_all(instance)
    instance.add_run(
        DagsterRun(
            job_name="tao_round",
            run_id="a" * 36,
            status=DagsterRunStatus.STARTED,
            tags={"dagster/partition": "round-0007"},
        )
    )
    skipped = tick(new_prompts_round_sensor, instance=instance)
    assert isinstance(skipped, dg.SkipReason) and "round-0007 is still running" in skipped.skip_message


def test_rows_appended_to_a_duckdb_table_are_ingested_once(flywheel, tmp_path, monkeypatch):
    import duckdb

    settings, instance = flywheel
    database = tmp_path / "app.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE requests (seq INTEGER, prompt VARCHAR, task VARCHAR)")
        con.execute(
            "INSERT INTO requests VALUES (1, 'What is 2 + 2?', 'arithmetic'), (2, 'Capital of Peru?', 'short_answer')"
        )
    config = tmp_path / "tao.toml"
    config.write_text(
        config.read_text()
        + f"""
[flywheel.table_source]
database = "{database}"
table = "requests"
order_column = "seq"
"""
    )
    first = tick(usage_log_sensor, instance=instance)
    apply(instance, first)
    [request] = first.run_requests
    assert ingest(instance, request).success
    assert isinstance(tick(usage_log_sensor, instance=instance), dg.SkipReason)

    with duckdb.connect(str(database)) as con:
        con.execute("INSERT INTO requests VALUES (3, 'What is 5 * 5?', 'arithmetic')")
    second = tick(usage_log_sensor, instance=instance)
    apply(instance, second)
    [request] = second.run_requests
    assert ingest(instance, request).success
    rows = pd.concat(pd.read_parquet(p) for p in (settings.lake_dir / "usage_logs").glob("*.parquet"))
    assert sorted(rows["prompt"]) == ["Capital of Peru?", "What is 2 + 2?", "What is 5 * 5?"]

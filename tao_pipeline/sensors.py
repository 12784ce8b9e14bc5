"""Sensors: ingest new usage-log files exactly once; open a round when enough new prompts arrived."""

from __future__ import annotations

import dagster as dg

from tao_pipeline.assets.partitions import LOG_BATCHES, ROUNDS, log_batches_partitions, next_round_key, rounds_partitions
from tao_pipeline.ingest import pending_log_files
from tao_pipeline.lake import Lake
from tao_pipeline.rounds import count_unused_prompts
from tao_pipeline.settings import TaoSettings, load_settings

INGEST_JOB = "ingest_usage_logs"
ROUND_JOB = "tao_round"
STARTUP_SETTINGS = load_settings()  # intervals and the cron are fixed when the code location loads


@dg.sensor(job_name=INGEST_JOB, minimum_interval_seconds=STARTUP_SETTINGS.flywheel.sensor_interval_s,
           default_status=dg.DefaultSensorStatus.RUNNING)
def usage_log_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """One log-batch partition and one ingest run per new file in the inbox (or in data.logs),
    after pulling rows appended to flywheel.table_source (if set) into a file.

    A file is keyed by its content hash, so a file seen again (same bytes, any name) is never
    ingested twice; the run key makes a re-evaluated tick harmless.
    """
    settings = load_settings()
    new = pending_log_files(settings, set(context.instance.get_dynamic_partitions(LOG_BATCHES)))
    if not new:
        return dg.SkipReason(f"no new usage-log files in {settings.inbox_dir}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=key, partition_key=key,
                          run_config={"ops": {"usage_logs": {"config": {"path": str(path)}}}})
            for key, path in new.items()
        ],
        dynamic_partitions_requests=[log_batches_partitions.build_add_request(list(new))],
        cursor=max(new),
    )


@dg.sensor(job_name=ROUND_JOB, minimum_interval_seconds=STARTUP_SETTINGS.flywheel.sensor_interval_s,
           default_status=dg.DefaultSensorStatus.RUNNING)
def new_prompts_round_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Open the next round once flywheel.min_new_prompts prompts are unused by any round."""
    settings = load_settings()
    decision = round_decision(context.instance, settings, settings.flywheel.min_new_prompts)
    if isinstance(decision, dg.SkipReason):
        return decision
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=decision, partition_key=decision)],
        dynamic_partitions_requests=[rounds_partitions.build_add_request([decision])],
        cursor=decision,
    )


_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]


def round_decision(instance: dg.DagsterInstance, settings: TaoSettings, threshold: int) -> str | dg.SkipReason:
    """The next round key if one should open now, else why not. Shared by the sensor and the schedule.

    Rounds run one after another, so each starts from the champion the previous one decided.
    """
    running = instance.get_runs(dg.RunsFilter(job_name=ROUND_JOB, statuses=_IN_FLIGHT), limit=1)
    if running:
        return dg.SkipReason(f"{running[0].tags.get('dagster/partition', 'a round')} is still running")
    lake = Lake(settings.lake_dir)
    rounds = instance.get_dynamic_partitions(ROUNDS)
    waiting = [key for key in rounds if not lake.exists("raw_prompts", key)]
    if waiting:
        # Its prompts are not taken yet; opening another round now would count them twice.
        return dg.SkipReason(f"{waiting[-1]} is open and has not taken its prompts yet")
    unused = count_unused_prompts(lake)
    if unused < threshold:
        return dg.SkipReason(f"{unused} unused prompts; a round opens at {threshold}")
    return next_round_key(rounds)

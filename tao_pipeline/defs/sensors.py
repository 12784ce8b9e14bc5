"""Sensors: ingest new usage-log files exactly once; open a round when enough new prompts arrived.

Each tick loads the settings once, through the settings resource (the source the code location
was started with). The tick interval itself is read when the code location loads.
"""

from __future__ import annotations

import dagster as dg

from tao_pipeline.data.ingest import pending_log_files
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.rounds import RoundDecision, decide_next_round
from tao_pipeline.defs.constants import INGEST_JOB, LOG_BATCHES, ROUND_JOB, ROUNDS
from tao_pipeline.defs.partitions import log_batches_partitions, rounds_partitions
from tao_pipeline.defs.resources import TaoSettingsResource, startup_settings
from tao_pipeline.settings import TaoSettings

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def build_usage_log_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="usage_log_sensor",
        job_name=INGEST_JOB,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def usage_log_sensor(
        context: dg.SensorEvaluationContext, settings: TaoSettingsResource
    ) -> dg.SensorResult | dg.SkipReason:
        """One log-batch partition and one ingest run per new file in the inbox (or in data.logs),
        after pulling rows appended to flywheel.table_source (if set) into a file.

        A file is keyed by its content hash, so a file seen again (same bytes, any name) is never
        ingested twice; the run key makes a re-evaluated tick harmless.
        """
        config = settings.get()
        new = pending_log_files(config, set(context.instance.get_dynamic_partitions(LOG_BATCHES)))
        if not new:
            return dg.SkipReason(f"no new usage-log files in {config.inbox_dir}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=key, partition_key=key, run_config={"ops": {"usage_logs": {"config": {"path": str(path)}}}}
                )
                for key, path in new.items()
            ],
            dynamic_partitions_requests=[log_batches_partitions.build_add_request(list(new))],
            cursor=max(new),
        )

    return usage_log_sensor


def build_round_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_prompts_round_sensor",
        job_name=ROUND_JOB,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def new_prompts_round_sensor(
        context: dg.SensorEvaluationContext, settings: TaoSettingsResource
    ) -> dg.SensorResult | dg.SkipReason:
        """Open the next round once flywheel.min_new_prompts prompts are unused by any round."""
        config = settings.get()
        decision = round_decision(context.instance, config, config.flywheel.min_new_prompts)
        if decision.round_id is None:
            return dg.SkipReason(decision.reason)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=decision.round_id, partition_key=decision.round_id)],
            dynamic_partitions_requests=[rounds_partitions.build_add_request([decision.round_id])],
            cursor=decision.round_id,
        )

    return new_prompts_round_sensor


def round_decision(instance: dg.DagsterInstance, settings: TaoSettings, min_unused: int) -> RoundDecision:
    """The round rule (:func:`decide_next_round`), after waiting for a round run still in flight.
    Shared by the sensor and the schedule."""
    running = instance.get_runs(dg.RunsFilter(job_name=ROUND_JOB, statuses=_IN_FLIGHT), limit=1)
    if running:
        return RoundDecision(None, f"{running[0].tags.get('dagster/partition', 'a round')} is still running")
    return decide_next_round(Lake(settings.lake_dir), instance.get_dynamic_partitions(ROUNDS), min_unused)


@dg.definitions
def sensors() -> dg.Definitions:
    interval_s = startup_settings().flywheel.sensor_interval_s
    return dg.Definitions(sensors=[build_usage_log_sensor(interval_s), build_round_sensor(interval_s)])

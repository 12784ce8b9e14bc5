"""The periodic round: on flywheel.schedule_cron, open a round if any prompt is new."""

import dagster as dg

from tao_pipeline.assets.partitions import ROUNDS
from tao_pipeline.sensors import ROUND_JOB, STARTUP_SETTINGS, round_decision
from tao_pipeline.settings import load_settings


@dg.schedule(job_name=ROUND_JOB, cron_schedule=STARTUP_SETTINGS.flywheel.schedule_cron,
             default_status=dg.DefaultScheduleStatus.RUNNING)
def periodic_round_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Retune periodically from whatever arrived since the last round; skip when nothing did."""
    decision = round_decision(context.instance, load_settings(), threshold=1)
    if isinstance(decision, dg.SkipReason):
        return decision
    # Schedules cannot return dynamic-partition requests (sensors can), so add it here.
    context.instance.add_dynamic_partitions(ROUNDS, [decision])
    return dg.RunRequest(run_key=decision, partition_key=decision)

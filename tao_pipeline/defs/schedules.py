"""The periodic round: on flywheel.schedule_cron, open a round if any prompt is new."""

import dagster as dg

from tao_pipeline.defs.constants import ROUND_JOB, ROUNDS
from tao_pipeline.defs.resources import TaoSettingsResource, startup_settings
from tao_pipeline.defs.sensors import round_decision


def build_periodic_round_schedule(cron: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="periodic_round_schedule",
        job_name=ROUND_JOB,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def periodic_round_schedule(
        context: dg.ScheduleEvaluationContext, settings: TaoSettingsResource
    ) -> dg.RunRequest | dg.SkipReason:
        """Retune periodically from whatever arrived since the last round; skip when nothing did."""
        decision = round_decision(context.instance, settings.get(), min_unused=1)
        if decision.round_id is None:
            return dg.SkipReason(decision.reason)
        # Schedules cannot return dynamic-partition requests (sensors can), so add it here.
        context.instance.add_dynamic_partitions(ROUNDS, [decision.round_id])
        return dg.RunRequest(run_key=decision.round_id, partition_key=decision.round_id)

    return periodic_round_schedule


@dg.definitions
def schedules() -> dg.Definitions:
    return dg.Definitions(schedules=[build_periodic_round_schedule(startup_settings().flywheel.schedule_cron)])

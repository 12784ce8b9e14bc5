"""The lake's mirror in object storage: a job, run by a sensor whenever a round ends, promoted or not."""

import dagster as dg

from tao_pipeline.defs.constants import MIRROR_JOB, STORAGE_GROUP
from tao_pipeline.defs.jobs import tao_round_job
from tao_pipeline.defs.resources import TaoSettingsResource

mirror_job = dg.define_asset_job(
    MIRROR_JOB,
    selection=dg.AssetSelection.groups(STORAGE_GROUP),
    description="Upload the lake's changed Parquet files to storage.lake_mirror_url.",
)


def _mirror_request(context: dg.RunStatusSensorContext, settings: TaoSettingsResource):
    if settings.get().storage.lake_mirror_url is None:
        return dg.SkipReason("storage.lake_mirror_url is not set")
    return dg.RunRequest(run_key=f"mirror-after-{context.dagster_run.run_id}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[tao_round_job],
    request_job=mirror_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def mirror_after_a_round(context: dg.RunStatusSensorContext, settings: TaoSettingsResource):
    """Mirror the lake once a round's run succeeds (its challenger promoted)."""
    return _mirror_request(context, settings)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.FAILURE,
    monitored_jobs=[tao_round_job],
    request_job=mirror_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def mirror_after_a_refused_round(context: dg.RunStatusSensorContext, settings: TaoSettingsResource):
    """Mirror the lake once a round's run ends without a promotion (its gate refused, or a stage failed)."""
    return _mirror_request(context, settings)


@dg.definitions
def storage() -> dg.Definitions:
    return dg.Definitions(jobs=[mirror_job], sensors=[mirror_after_a_round, mirror_after_a_refused_round])

"""The lake's mirror in object storage: a job, run by a sensor whenever a round ends, promoted or not."""

import dagster as dg

from tao_pipeline.defs.constants import MIRROR_JOB, STORAGE_GROUP
from tao_pipeline.defs.jobs import tao_round_job
from tao_pipeline.defs.resources import TaoSettingsResource, startup_settings

mirror_job = dg.define_asset_job(
    MIRROR_JOB,
    selection=dg.AssetSelection.groups(STORAGE_GROUP),
    description="Upload the lake's changed Parquet files to storage.lake_mirror_url.",
)


def build_mirror_sensor(status: dg.DagsterRunStatus, interval_s: int) -> dg.RunStatusSensorDefinition:
    """Mirror the lake once a round's run ends with ``status`` (success: promoted; failure: refused, or a
    stage failed), when storage.lake_mirror_url is set."""

    @dg.run_status_sensor(
        name=f"mirror_after_a_round_{status.value.lower()}",
        run_status=status,
        monitored_jobs=[tao_round_job],
        request_job=mirror_job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def mirror_after_a_round(context: dg.RunStatusSensorContext, settings: TaoSettingsResource):
        if settings.get().storage.lake_mirror_url is None:
            return dg.SkipReason("storage.lake_mirror_url is not set")
        return dg.RunRequest(run_key=f"mirror-after-{context.dagster_run.run_id}")

    return mirror_after_a_round


@dg.definitions
def storage() -> dg.Definitions:
    interval_s = startup_settings().flywheel.sensor_interval_s
    sensors = [
        build_mirror_sensor(status, interval_s) for status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
    ]
    return dg.Definitions(jobs=[mirror_job], sensors=sensors)

"""The two jobs the automation launches, and the code location's executor."""

import dagster as dg

from tao_pipeline.defs.constants import INGEST_JOB, INGEST_STAGE, INGESTION_GROUP, ROUND_GROUP, ROUND_JOB, STAGE_TAG
from tao_pipeline.defs.partitions import log_batches_partitions, rounds_partitions

# A round whose process was lost (killed with the daemon, out of memory, a reboot, a run that never started) is
# re-executed by Dagster's run retries from the stage it lost, reusing every cached shard; never one that failed
# on its own error (the instance sets retry_on_asset_or_op_failure: false). See cli/instance.py.
ROUND_RETRIES = 2
tao_round_job = dg.define_asset_job(
    ROUND_JOB,
    selection=dg.AssetSelection.groups(ROUND_GROUP),
    partitions_def=rounds_partitions,
    tags={"dagster/max_retries": str(ROUND_RETRIES), "dagster/retry_strategy": "FROM_FAILURE"},
    description="One TAO round: prompts -> candidates -> scores -> pairs -> DPO -> evaluation -> promotion.",
)
ingest_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.groups(INGESTION_GROUP),
    partitions_def=log_batches_partitions,
    tags={STAGE_TAG: INGEST_STAGE},  # queued beyond flywheel.max_concurrent_ingest_runs (cli/instance.py)
    description="Ingest one usage-log file into the usage_logs table.",
)


@dg.definitions
def jobs() -> dg.Definitions:
    # One process per run, as `tao round` does: with Dagster's default (a process per step) every
    # step would import torch and load a model again. Heavy steps are serialized by the gpu pool.
    return dg.Definitions(jobs=[tao_round_job, ingest_job], executor=dg.in_process_executor)

"""The code location: every definition is loaded here, in one place."""

import dagster as dg

from tao_pipeline.assets import INGEST_ASSETS, ROUND_ASSETS
from tao_pipeline.assets.partitions import log_batches_partitions, rounds_partitions
from tao_pipeline.checks import EVALUATION_CHECKS
from tao_pipeline.resources import build_resources
from tao_pipeline.schedules import periodic_round_schedule
from tao_pipeline.sensors import INGEST_JOB, ROUND_JOB, new_prompts_round_sensor, usage_log_sensor
from tao_pipeline.settings import load_settings

# Fail at load time, with the setting named, rather than in the middle of a round.
load_settings()

tao_round_job = dg.define_asset_job(
    ROUND_JOB, selection=dg.AssetSelection.assets(*ROUND_ASSETS), partitions_def=rounds_partitions,
    description="One TAO round: prompts -> candidates -> scores -> pairs -> DPO -> evaluation -> promotion.",
)
ingest_job = dg.define_asset_job(
    INGEST_JOB, selection=dg.AssetSelection.assets(*INGEST_ASSETS), partitions_def=log_batches_partitions,
    description="Ingest one usage-log file into the usage_logs table.",
)

defs = dg.Definitions(
    assets=[*INGEST_ASSETS, *ROUND_ASSETS],
    asset_checks=EVALUATION_CHECKS,
    jobs=[tao_round_job, ingest_job],
    sensors=[usage_log_sensor, new_prompts_round_sensor],
    schedules=[periodic_round_schedule],
    resources=build_resources(),
    # One process per run, as `tao round` does: with Dagster's default (a process per step) every
    # step would import torch and load a model again. Heavy steps are serialized by the gpu pool.
    executor=dg.in_process_executor,
)

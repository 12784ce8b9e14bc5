"""The code location: every definition is loaded here, in one place."""

import dagster as dg

from tao_pipeline.assets import ROUND_ASSETS
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.resources import build_resources
from tao_pipeline.settings import load_settings

# Fail at load time, with the setting named, rather than in the middle of a round.
load_settings()

tao_round_job = dg.define_asset_job(
    "tao_round", selection=dg.AssetSelection.assets(*ROUND_ASSETS), partitions_def=rounds_partitions,
    description="One TAO round: prompts -> candidates -> scores -> pairs -> DPO -> evaluation -> promotion.",
)

defs = dg.Definitions(assets=ROUND_ASSETS, jobs=[tao_round_job], resources=build_resources())

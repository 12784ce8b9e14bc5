"""Stage 1: the round's prompts: usage-log prompts no other round has used, deduplicated and split."""

import dagster as dg
import pandas as pd

from tao_pipeline.data.rounds import select_round_prompts
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, TaoSettingsResource


@dg.asset(
    **ROUND_STAGE,
    kinds={"parquet", "duckdb"},
    deps=[dg.AssetDep("usage_logs", partition_mapping=dg.AllPartitionMapping())],
)
def raw_prompts(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource
) -> dg.MaterializeResult:
    """Take the prompts no other round used (plus flywheel.replay_fraction of used ones), split by hash."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    prompts = select_round_prompts(store, round_id, config.data, config.flywheel.replay_fraction)
    if prompts.empty:
        raise dg.Failure(f"{round_id} has no prompts: ingest usage logs first (inbox {config.inbox_dir})")
    path = store.write("raw_prompts", round_id, prompts.assign(round=round_id))
    return dg.MaterializeResult(metadata={**_metadata(prompts), "path": dg.MetadataValue.path(str(path))})


def _metadata(prompts: pd.DataFrame) -> dict:
    splits = prompts["split"].value_counts()
    return {
        "prompts": len(prompts),
        "usage_log_rows": int(prompts["log_ids"].map(len).sum()),
        "train": int(splits.get("train", 0)),
        "heldout": int(splits.get("heldout", 0)),
        "per_task": md_table(prompts.groupby(["task", "split"]).size().rename("prompts").reset_index()),
        "preview": md_table(prompts[["prompt_id", "task", "split", "prompt"]]),
    }

"""Stage 1: the round's prompts: usage-log prompts no other round has used, deduplicated and split."""

import dagster as dg

from tao_pipeline.assets.metadata import md_table
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.resources import LakeResource, TaoSettingsResource
from tao_pipeline.rounds import select_round_prompts


@dg.asset(
    partitions_def=rounds_partitions, group_name="tao_round", kinds={"parquet", "duckdb"},
    deps=[dg.AssetDep("usage_logs", partition_mapping=dg.AllPartitionMapping())],
)
def raw_prompts(context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource) -> dg.MaterializeResult:
    """Take the prompts no other round used (plus flywheel.replay_fraction of used ones), split by hash."""
    config = settings.get()
    round_id = context.partition_key
    prompts = select_round_prompts(lake.get(), round_id, config.data, config.flywheel.replay_fraction)
    if prompts.empty:
        raise dg.Failure(f"{round_id} has no prompts: ingest usage logs first (inbox {config.inbox_dir})")
    path = lake.get().write("raw_prompts", round_id, prompts.assign(round=round_id))
    splits = prompts["split"].value_counts()
    return dg.MaterializeResult(metadata={
        "prompts": len(prompts),
        "usage_log_rows": int(prompts["log_ids"].map(len).sum()),
        "train": int(splits.get("train", 0)),
        "heldout": int(splits.get("heldout", 0)),
        "per_task": md_table(prompts.groupby(["task", "split"]).size().rename("prompts").reset_index()),
        "preview": md_table(prompts[["prompt_id", "task", "split", "prompt"]]),
        "path": dg.MetadataValue.path(str(path)),
    })

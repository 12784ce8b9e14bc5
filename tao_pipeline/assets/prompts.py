"""Stage 1: usage logs -> validated, deduplicated prompts split into train and held-out."""

import dagster as dg

from tao_pipeline.assets.metadata import md_table
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.prompts import load_prompts
from tao_pipeline.resources import LakeResource, TaoSettingsResource

QUARANTINE_TABLE = "quarantined_rows"


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", kinds={"parquet", "duckdb"})
def raw_prompts(context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource) -> dg.MaterializeResult:
    """Read the usage logs, quarantine bad rows with a reason, deduplicate by content hash, split by hash."""
    config = settings.get()
    batch = load_prompts(config.data.logs, config.data)
    round_id = context.partition_key
    path = lake.get().write("raw_prompts", round_id, batch.prompts.assign(round=round_id))
    lake.get().write(QUARANTINE_TABLE, round_id, batch.quarantine.assign(round=round_id))
    if not batch.quarantine.empty:
        context.log.warning(f"quarantined {len(batch.quarantine)} bad log rows; see the {QUARANTINE_TABLE} table")
    splits = batch.prompts["split"].value_counts()
    return dg.MaterializeResult(metadata={
        "log_rows": batch.log_rows,
        "prompts": len(batch.prompts),
        "duplicates_merged": batch.duplicates,
        "train": int(splits.get("train", 0)),
        "heldout": int(splits.get("heldout", 0)),
        "quarantined": len(batch.quarantine),
        "quarantine_reasons": md_table(batch.quarantine[["source_file", "line_number", "reason"]], rows=20),
        "per_task": md_table(batch.prompts.groupby(["task", "split"]).size().rename("prompts").reset_index()),
        "preview": md_table(batch.prompts[["prompt_id", "task", "split", "prompt"]]),
        "path": dg.MetadataValue.path(str(path)),
    })

"""Ingestion: one usage-log file per log-batch partition into the usage_logs table."""

from pathlib import Path

import dagster as dg
import pandas as pd

from tao_pipeline.assets.metadata import md_table
from tao_pipeline.assets.partitions import log_batches_partitions
from tao_pipeline.ingest import UnreadableLogFile, archive_file, ingest_file
from tao_pipeline.resources import LakeResource, TaoSettingsResource

QUARANTINE_TABLE = "quarantined_rows"


class IngestConfig(dg.Config):
    path: str  # the usage-log file this batch holds; the sensor fills it in


@dg.asset(partitions_def=log_batches_partitions, group_name="ingestion", kinds={"parquet", "duckdb"})
def usage_logs(
    context: dg.AssetExecutionContext, config: IngestConfig, settings: TaoSettingsResource, lake: LakeResource,
) -> dg.MaterializeResult:
    """Validate one usage-log file (JSONL, Parquet or CSV): good rows in, bad rows quarantined with a reason."""
    tao = settings.get()
    path = Path(config.path)
    store, batch = lake.get(), context.partition_key
    try:
        ingested = ingest_file(path, tao.data)
    except UnreadableLogFile as error:
        # Reported once and archived, so the sensor never retries the file forever.
        unreadable = pd.DataFrame([{"source_file": str(path), "line_number": None, "reason": str(error), "raw": ""}])
        store.write(QUARANTINE_TABLE, batch, unreadable.assign(batch=batch))
        archive_file(path, tao.inbox_dir, "failed")
        context.log.error(str(error))
        return dg.MaterializeResult(metadata={"rows": 0, "unreadable": str(error)})
    store.write("usage_logs", batch, ingested.rows.assign(batch=batch))
    store.write(QUARANTINE_TABLE, batch, ingested.quarantine.assign(batch=batch))
    archived = archive_file(path, tao.inbox_dir, "processed")
    if not ingested.quarantine.empty:
        context.log.warning(f"quarantined {len(ingested.quarantine)} rows of {path.name}")
    return dg.MaterializeResult(metadata={
        "source_file": str(path),
        "archived_to": str(archived) if archived else "left in place (configured file)",
        "rows": len(ingested.rows),
        "distinct_prompts": int(ingested.rows["prompt_id"].nunique()),
        "quarantined": len(ingested.quarantine),
        "quarantine_reasons": md_table(ingested.quarantine[["line_number", "reason"]], rows=20),
        "per_task": md_table(ingested.rows.groupby("task").size().rename("rows").reset_index()),
    })

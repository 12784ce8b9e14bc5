"""Ingestion: one usage-log file per log-batch partition into the usage_logs table."""

from pathlib import Path

import dagster as dg

from tao_pipeline.data.ingest import (
    QUARANTINE_PREVIEW_ROWS,
    IngestSummary,
    UnreadableLogFile,
    archive_file,
    ingest_to_lake,
    quarantine_unreadable_file,
)
from tao_pipeline.defs.constants import INGESTION_GROUP
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.defs.partitions import log_batches_partitions
from tao_pipeline.defs.resources import LakeResource, TaoSettingsResource


class IngestConfig(dg.Config):
    path: str  # the usage-log file this batch holds; the sensor fills it in


@dg.asset(partitions_def=log_batches_partitions, group_name=INGESTION_GROUP, kinds={"parquet", "duckdb"})
def usage_logs(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    settings: TaoSettingsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    """Validate one usage-log file (JSONL, JSON array, Parquet or CSV) in chunks, streamed into the lake:
    good rows in, bad rows quarantined with a reason."""
    tao, path, store, batch = settings.get(), Path(config.path), lake.get(), context.partition_key
    try:
        ingested = ingest_to_lake(path, tao.data, store, batch)
    except UnreadableLogFile as error:
        # Reported once and archived, so the sensor never retries the file forever.
        quarantine_unreadable_file(store, batch, path, error)
        archive_file(path, tao.inbox_dir, "failed")
        context.log.error(str(error))
        return dg.MaterializeResult(metadata={"rows": 0, "unreadable": str(error)})
    archived = archive_file(path, tao.inbox_dir, "processed")
    if ingested.quarantined:
        context.log.warning(f"quarantined {ingested.quarantined} rows of {path.name}")
    return dg.MaterializeResult(metadata=_metadata(path, archived, ingested))


def _metadata(path: Path, archived: Path | None, ingested: IngestSummary) -> dict:
    return {
        "source_file": str(path),
        "archived_to": str(archived) if archived else "left in place (configured file)",
        "rows": ingested.rows,
        "distinct_prompts": ingested.distinct_prompts,
        "quarantined": ingested.quarantined,
        "quarantine_reasons": md_table(ingested.quarantine_reasons(), rows=QUARANTINE_PREVIEW_ROWS),
        "per_task": md_table(ingested.per_task()),
    }

"""Ingestion: one usage-log file per log-batch partition into the usage_logs table."""

from pathlib import Path

import dagster as dg

from tao_pipeline.data.ingest import QUARANTINE_PREVIEW_ROWS, BatchOutcome, ingest_log_batch
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
    good rows in, bad rows quarantined with a reason; then archive it out of the inbox."""
    outcome = ingest_log_batch(Path(config.path), settings.get(), lake.get(), context.partition_key)
    for warning in outcome.warnings():
        context.log.warning(warning)
    if outcome.summary is None:  # unreadable (quarantined and archived once: never retried), or done elsewhere
        return dg.MaterializeResult(metadata={"rows": 0, "unreadable": outcome.unreadable, "skipped": outcome.skipped})
    return dg.MaterializeResult(metadata=_metadata(outcome))


def _metadata(outcome: BatchOutcome) -> dict:
    ingested = outcome.summary
    return {
        "source_file": str(outcome.path),
        "archived_to": str(outcome.archived_to or outcome.archive_problem or "left in place (configured file)"),
        "rows": ingested.rows,
        "distinct_prompts": ingested.distinct_prompts,
        "conflicting_external_ids": ingested.conflicting_ids,  # one id, several different prompts
        "conversations": ingested.conversations,  # rows with earlier turns
        "answered_rows": ingested.answered,  # rows that carry the answer the app gave
        "rated": ingested.rated,  # ratings and corrections, in rows and feedback events
        "feedback_events": ingested.feedback_events,
        "batch_output_responses": ingested.response_events,
        "rows_with_parts_left_out": ingested.rows_left_out,  # images, audio, tool calls: kept without them
        "quarantined": ingested.quarantined,
        "quarantine_reasons": md_table(ingested.quarantine_reasons(), rows=QUARANTINE_PREVIEW_ROWS),
        "per_task": md_table(ingested.per_task()),
        "catalog": ingested.catalog_warning or "views up to date",
    }

"""Ingestion: usage-log files into the usage_logs table, one log-batch partition per file; a run takes one
file (`tao round`, the launchpad) or a range of them (the usage-log sensor, after a burst)."""

from pathlib import Path

import dagster as dg
import pandas as pd

from tao_pipeline.data.ingest import QUARANTINE_PREVIEW_ROWS, BatchOutcome, FilesOutcome, ingest_log_files
from tao_pipeline.defs.constants import INGESTION_GROUP
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.defs.partitions import log_batches_partitions
from tao_pipeline.defs.resources import LakeResource, TaoSettingsResource


class IngestConfig(dg.Config):
    path: str = ""  # the usage-log file of a one-partition run (`tao round`, the launchpad)
    paths: dict[str, str] = {}  # a file per partition of the run's range; the usage-log sensor fills it in


@dg.asset(partitions_def=log_batches_partitions, group_name=INGESTION_GROUP, kinds={"parquet", "duckdb"})
def usage_logs(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    settings: TaoSettingsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    """Validate each usage-log file (JSONL, JSON array, Parquet or CSV) in chunks, streamed into the lake:
    good rows in, bad rows quarantined with a reason; then archive it out of the inbox."""
    ingested = ingest_log_files(_files(context, config), settings.get(), lake.get())
    for warning in (warning for outcome in ingested.outcomes.values() for warning in outcome.warnings()):
        context.log.warning(warning)
    if ingested.errors:
        _fail(context, ingested)
    if len(ingested.outcomes) == 1:
        return dg.MaterializeResult(metadata=_metadata(next(iter(ingested.outcomes.values()))))
    return dg.MaterializeResult(metadata=_range_metadata(ingested))


def _files(context: dg.AssetExecutionContext, config: IngestConfig) -> dict[str, Path]:
    """The run's file per partition key: a partition of its range with none (added meanwhile by another
    process, which ingests it) is left out and said so."""
    if not config.paths and not config.path:
        raise dg.Failure(description="usage_logs needs its file: set ops.usage_logs.config.path in the run config")
    given = {key: Path(path) for key, path in config.paths.items()} or {context.partition_key: Path(config.path)}
    for key in set(context.partition_keys) - set(given):
        context.log.warning(f"log batch {key} is in this run's range but was given no file: its own run ingests it")
    return {key: given[key] for key in context.partition_keys if key in given}


def _fail(context: dg.AssetExecutionContext, ingested: FilesOutcome) -> None:
    """The files that went in are materialized; the run fails naming the others, which the sensor retries."""
    if len(ingested.paths) == 1:
        raise next(iter(ingested.errors.values()))
    for key, outcome in ingested.outcomes.items():
        context.log_event(dg.AssetMaterialization(context.asset_key, partition=key, metadata=_metadata(outcome)))
    raise dg.Failure(description=ingested.failure())


def _metadata(outcome: BatchOutcome) -> dict:
    if outcome.summary is None:  # unreadable (quarantined and archived once: never retried), or done elsewhere
        return {"rows": 0, "unreadable": outcome.unreadable, "skipped": outcome.skipped}
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


def _range_metadata(ingested: FilesOutcome) -> dict:
    """A run over several files: totals, and a row per file (each partition gets this same record)."""
    rows = [
        {
            "log_batch": key,
            "file": outcome.path.name,
            "rows": outcome.summary.rows if outcome.summary else 0,
            "quarantined": outcome.summary.quarantined if outcome.summary else 0,
            "note": outcome.unreadable or outcome.skipped or outcome.archive_problem or "",
        }
        for key, outcome in ingested.outcomes.items()
    ]
    return {
        "files": len(rows),
        "rows": sum(row["rows"] for row in rows),
        "quarantined": sum(row["quarantined"] for row in rows),
        "per_file": md_table(pd.DataFrame(rows), rows=len(rows)),
    }

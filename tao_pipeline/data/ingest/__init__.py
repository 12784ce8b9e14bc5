"""Usage-log files (JSONL, JSON arrays, Parquet, CSV) and table rows -> the usage_logs table, plus quarantine.

- ``inbox``: the inbox contract: which files may be read, which are ready (unchanged for
  ``flywheel.settle_seconds``) and new (a file is keyed by the hash of its content and counts
  as ingested once its rows are committed to the lake), and where a handled file goes;
- ``table_source``: rows an app appends to a DuckDB table, exported into files for ingestion;
- ``readers``: each format's records; ``validation``: a record -> a valid row or its reason;
- ``writer``: a file's rows streamed into the lake in bounded memory;
- ``batch``: one file end to end (streamed in, or quarantined when unreadable, then archived);
- ``offline``: files straight into prompts, without a lake (notebooks, benchmarks).
"""

from tao_pipeline.data.ingest.batch import BatchOutcome, FilesOutcome, ingest_log_batch, ingest_log_files
from tao_pipeline.data.ingest.inbox import (
    InboxScan,
    archive_file,
    archive_ingested,
    batch_key,
    pending_log_files,
    plan_ingest_runs,
    scan_inbox,
)
from tao_pipeline.data.ingest.offline import PromptBatch, load_prompts
from tao_pipeline.data.ingest.readers import LOG_SUFFIXES, UnreadableLogFile, read_jsonl, read_records
from tao_pipeline.data.ingest.table_source import export_new_table_rows
from tao_pipeline.data.ingest.validation import QUARANTINE_COLUMNS, LogRow, RowRejected, parse_record
from tao_pipeline.data.ingest.writer import (
    CHUNK_ROWS,
    QUARANTINE_PREVIEW_ROWS,
    QUARANTINE_TABLE,
    USAGE_LOG_COLUMNS,
    USAGE_TABLE,
    IngestSummary,
    ingest_file,
    ingest_to_lake,
    quarantine_unreadable_file,
    read_log_chunks,
)

__all__ = [
    "BatchOutcome",
    "FilesOutcome",
    "CHUNK_ROWS",
    "LOG_SUFFIXES",
    "QUARANTINE_COLUMNS",
    "QUARANTINE_PREVIEW_ROWS",
    "QUARANTINE_TABLE",
    "USAGE_LOG_COLUMNS",
    "USAGE_TABLE",
    "InboxScan",
    "IngestSummary",
    "LogRow",
    "PromptBatch",
    "RowRejected",
    "UnreadableLogFile",
    "archive_file",
    "archive_ingested",
    "batch_key",
    "export_new_table_rows",
    "ingest_file",
    "ingest_log_batch",
    "ingest_log_files",
    "ingest_to_lake",
    "load_prompts",
    "parse_record",
    "pending_log_files",
    "plan_ingest_runs",
    "scan_inbox",
    "quarantine_unreadable_file",
    "read_jsonl",
    "read_log_chunks",
    "read_records",
]

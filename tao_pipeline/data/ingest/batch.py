"""One log batch end to end: a file streamed into the lake, then archived out of the inbox.

A file that cannot be read at all is quarantined once (one row naming the problem) and moved to
``inbox/failed/``, so nobody retries it forever; a file that was read goes to ``inbox/processed/``.
Configured files outside the inbox (``data.logs``) stay where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tao_pipeline.data.ingest.inbox import archive_file
from tao_pipeline.data.ingest.readers import UnreadableLogFile
from tao_pipeline.data.ingest.writer import IngestSummary, ingest_to_lake, quarantine_unreadable_file
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import TaoSettings


@dataclass
class BatchOutcome:
    path: Path
    archived_to: Path | None  # None: a configured file, left in place
    summary: IngestSummary | None  # None when the file could not be read at all
    unreadable: str | None = None  # why not


def ingest_log_batch(path: Path, settings: TaoSettings, lake: Lake, batch: str) -> BatchOutcome:
    """Ingest one file as partition ``batch`` of usage_logs and quarantined_rows, then archive it."""
    try:
        summary = ingest_to_lake(path, settings.data, lake, batch)
    except UnreadableLogFile as error:
        quarantine_unreadable_file(lake, batch, path, error)
        return BatchOutcome(path, archive_file(path, settings.inbox_dir, "failed"), None, str(error))
    return BatchOutcome(path, archive_file(path, settings.inbox_dir, "processed"), summary)

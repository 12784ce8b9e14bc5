"""One log batch end to end: a file streamed into the lake, then archived out of the inbox.
Several at once (an ingest run over a range of log batches): each file on its own, so one that fails
leaves the others committed and is retried alone.

A file that cannot be read at all is quarantined once (one row naming the problem) and moved to
``inbox/failed/``, so nobody retries it forever; a file that was read goes to ``inbox/processed/``.
Configured files outside the inbox (``data.logs``) stay where they are. A batch another process
has already committed (the same file, ingested twice at once) is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tao_pipeline.common.safe_files import UnsafePathError
from tao_pipeline.data.ingest.inbox import archive_file, still_a_regular_file
from tao_pipeline.data.ingest.readers import UnreadableLogFile
from tao_pipeline.data.ingest.writer import USAGE_TABLE, IngestSummary, ingest_to_lake, quarantine_unreadable_file
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import TaoSettings


@dataclass
class BatchOutcome:
    path: Path
    archived_to: Path | None  # None: a configured file, left in place, or archived by another process
    summary: IngestSummary | None  # None when the file could not be read at all, or was not read
    unreadable: str | None = None  # why it could not be read
    skipped: str | None = None  # why it was not read: another process ingested it
    archive_problem: str | None = None  # why it stayed in the inbox (inbox/processed is not a real folder)

    def warnings(self) -> list[str]:
        """What a person should hear about a batch that was read."""
        summary, name = self.summary, self.path.name
        if summary is None:  # unreadable (quarantined once, never retried), or ingested elsewhere
            return [self.unreadable or self.skipped or ""] + ([self.archive_problem] if self.archive_problem else [])
        found = [f"quarantined {summary.quarantined} rows of {name}"] if summary.quarantined else []
        if summary.conflicting_ids:
            found.append(f"{summary.conflicting_ids} external ids of {name} name more than one different prompt")
        found += [summary.catalog_warning] if summary.catalog_warning else []
        return found + ([self.archive_problem] if self.archive_problem else [])


def ingest_log_batch(path: Path, settings: TaoSettings, lake: Lake, batch: str) -> BatchOutcome:
    """Ingest one file as partition ``batch`` of usage_logs and quarantined_rows, then archive it."""
    in_inbox = path.parent.resolve() == settings.inbox_dir.resolve()
    try:
        if in_inbox and not still_a_regular_file(path):
            raise FileNotFoundError(f"{path} is gone or no longer a regular file")
        summary = ingest_to_lake(path, settings.data, lake, batch)
    except UnreadableLogFile as error:
        quarantine_unreadable_file(lake, batch, path, error)
        return _archived(BatchOutcome(path, None, None, str(error)), settings, "failed")
    except FileNotFoundError:
        if not lake.exists(USAGE_TABLE, batch):
            raise
        return BatchOutcome(path, None, None, skipped=f"{path.name} was ingested by another process as {batch}")
    return _archived(BatchOutcome(path, None, summary), settings, "processed")


def _archived(outcome: BatchOutcome, settings: TaoSettings, folder: str) -> BatchOutcome:
    """The outcome once its file is moved to inbox/<folder>/; a folder that is not a real one moves nothing
    (the rows are committed all the same, and the file, ingested, stays in the inbox)."""
    try:
        outcome.archived_to = archive_file(outcome.path, settings.inbox_dir, folder)
    except UnsafePathError as error:
        outcome.archive_problem = f"{outcome.path.name} was not archived: {error}"
    return outcome


@dataclass
class FilesOutcome:
    """Several files ingested in one run: each one's outcome, or the error that stopped it, by batch key."""

    outcomes: dict[str, BatchOutcome] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def failure(self) -> str:
        """One line per file that failed, naming it: these batches are retried, the others are in."""
        lines = [f"{key} ({self.paths[key].name}): {type(e).__name__}: {e}" for key, e in self.errors.items()]
        return f"{len(self.errors)} of {len(self.paths)} log files failed and will be retried: " + "; ".join(lines)


def ingest_log_files(files: Mapping[str, Path], settings: TaoSettings, lake: Lake) -> FilesOutcome:
    """Ingest each file as its own batch (:func:`ingest_log_batch`), in order; a file whose ingestion raises
    is recorded and the next one goes on, so a run over many files commits every file it can."""
    result = FilesOutcome(paths=dict(files))
    for key, path in files.items():
        try:
            result.outcomes[key] = ingest_log_batch(path, settings, lake, key)
        except Exception as error:  # any error: reported with its file's name once the others are committed
            result.errors[key] = error
    return result

"""A usage-log file -> partition ``batch`` of the usage_logs and quarantined_rows tables, streamed.

Each row gets a content-hash id (file hash + row number), the time it was received and its
source file. Rows are read, validated and written CHUNK_ROWS at a time into temp files beside
their partitions, renamed into place only once the whole file has been read, so memory stays
bounded however large the file is, and a file that turns out unreadable halfway leaves the lake
as it was.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.hashing import content_hash, file_digest
from tao_pipeline.data.ingest.readers import UnreadableLogFile, read_records
from tao_pipeline.data.ingest.validation import LogEvent, LoggedAnswer, LogRow
from tao_pipeline.data.lake import DuckDBLockTimeout, Lake, LakeFileError
from tao_pipeline.data.prompts import prompt_id_for
from tao_pipeline.settings import DataSettings

USAGE_TABLE = "usage_logs"
QUARANTINE_TABLE = "quarantined_rows"
EVENTS_TABLE = "log_events"
_TEXT = pa.large_string()  # what pandas' string columns become, as in the lake's other tables
_ANSWER_FIELDS = [  # the answer a row's app already gave, and what its user did with it
    ("response", _TEXT),
    ("response_id", _TEXT),
    ("response_model", _TEXT),
    ("rating", pa.float64()),
    ("comment", _TEXT),
    ("correction", _TEXT),
    ("live_arm", _TEXT),  # tao serve during a live experiment: champion, canary or shadow
    ("live_pair", _TEXT),
    ("latency_ms", pa.float64()),
    ("answered_at", pa.timestamp("us")),  # when tao serve answered (received_at: when the row was ingested)
]
USAGE_LOG_SCHEMA = pa.schema(
    [
        ("log_id", _TEXT),
        ("external_id", _TEXT),
        ("prompt_id", _TEXT),
        ("prompt", _TEXT),
        ("system", _TEXT),
        ("task", _TEXT),
        ("constraints", _TEXT),
        ("history", _TEXT),
        ("left_out", _TEXT),
        *_ANSWER_FIELDS,
        ("source_file", _TEXT),
        ("line_number", pa.int64()),
        ("received_at", pa.timestamp("us")),
    ]
)
# Feedback on answers served earlier, and Batch API output lines: joined to usage rows by response id
# (feedback) or external id (a batch output answers the input row with its custom_id).
EVENTS_SCHEMA = pa.schema(
    [
        ("event_id", _TEXT),
        ("kind", _TEXT),
        ("external_id", _TEXT),
        *_ANSWER_FIELDS,
        ("source_file", _TEXT),
        ("line_number", pa.int64()),
        ("received_at", pa.timestamp("us")),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("source_file", _TEXT), ("line_number", pa.int64()), ("reason", _TEXT), ("raw", _TEXT)])
USAGE_LOG_COLUMNS = USAGE_LOG_SCHEMA.names
CHUNK_ROWS = 50_000  # rows (good and quarantined) validated and written at a time
QUARANTINE_PREVIEW_ROWS = 20
_DISTINCT_MEMORY_LIMIT = "32MB"  # counting distinct prompts spills to disk beyond this


@dataclass
class IngestChunk:
    """Up to CHUNK_ROWS rows of one file: the good ones (USAGE_LOG_SCHEMA) and the quarantined ones."""

    rows: pa.Table
    quarantine: pa.Table
    events: pa.Table


@dataclass
class IngestedBatch:
    rows: pd.DataFrame
    quarantine: pd.DataFrame
    events: pd.DataFrame


@dataclass
class IngestSummary:
    """What ingest_to_lake wrote: counts and a preview of quarantine reasons, gathered chunk by chunk."""

    rows: int = 0
    quarantined: int = 0
    conversations: int = 0  # rows with earlier turns
    answered: int = 0  # rows that carry the answer already given
    rated: int = 0  # rows and events with a rating or a correction
    feedback_events: int = 0
    response_events: int = 0
    rows_left_out: int = 0  # rows that lost a part the model cannot take (images, tool calls)
    distinct_prompts: int = 0
    conflicting_ids: int = 0  # external ids given to more than one distinct prompt in the file
    rows_per_task: Counter[str] = field(default_factory=Counter)
    catalog_warning: str | None = None  # the rows are in, but the catalog was locked
    quarantine_preview: list[tuple[int | None, str]] = field(default_factory=list)

    def add(self, chunk: IngestChunk) -> None:
        self.rows += chunk.rows.num_rows
        self.quarantined += chunk.quarantine.num_rows
        self.conversations += chunk.rows.num_rows - chunk.rows.column("history").null_count
        self.answered += chunk.rows.num_rows - chunk.rows.column("response").null_count
        self.rows_left_out += chunk.rows.num_rows - chunk.rows.column("left_out").null_count
        for table in (chunk.rows, chunk.events):
            rated = pc.or_(pc.is_valid(table.column("rating")), pc.is_valid(table.column("correction")))
            self.rated += pc.sum(rated.cast(pa.int64())).as_py() or 0
        kinds = chunk.events.column("kind").to_pylist()
        self.feedback_events += kinds.count("feedback")
        self.response_events += kinds.count("response")
        for counted in chunk.rows.column("task").value_counts().to_pylist():
            self.rows_per_task[counted["values"]] += counted["counts"]
        room = QUARANTINE_PREVIEW_ROWS - len(self.quarantine_preview)
        preview = chunk.quarantine.slice(0, max(room, 0))
        self.quarantine_preview += zip(preview["line_number"].to_pylist(), preview["reason"].to_pylist())

    def per_task(self) -> pd.DataFrame:
        return pd.DataFrame(sorted(self.rows_per_task.items()), columns=["task", "rows"])

    def quarantine_reasons(self) -> pd.DataFrame:
        return pd.DataFrame(self.quarantine_preview, columns=["line_number", "reason"])


def ingest_to_lake(
    path: Path, limits: DataSettings, lake: Lake, batch: str, chunk_rows: int = CHUNK_ROWS
) -> IngestSummary:
    """Stream one usage-log file into partition ``batch`` of usage_logs and quarantined_rows.

    The two partitions are written whole to temp files, then renamed into place, the quarantined
    rows first and the usage rows last: the usage_logs partition is the commit, so a batch is in
    the lake with both its kept and its quarantined rows, or not at all (and is read again). An
    UnreadableLogFile halfway (a corrupt Parquet page) leaves the lake as it was. The catalog's
    views are refreshed afterwards; a catalog locked by someone else delays only that.
    """
    summary = IngestSummary()
    rows_path = lake.path(USAGE_TABLE, batch)
    # The context that exits last renames last: the usage rows, the commit.
    with (
        _partition_writer(rows_path, USAGE_LOG_SCHEMA, batch) as rows_out,
        _partition_writer(lake.path(EVENTS_TABLE, batch), EVENTS_SCHEMA, batch) as events_out,
        _partition_writer(lake.path(QUARANTINE_TABLE, batch), QUARANTINE_SCHEMA, batch) as quarantine_out,
    ):
        for chunk in read_log_chunks(path, limits, chunk_rows):
            rows_out.write(chunk.rows)
            events_out.write(chunk.events)
            quarantine_out.write(chunk.quarantine)
            summary.add(chunk)
    summary.catalog_warning = _refresh_views(lake, (USAGE_TABLE, EVENTS_TABLE, QUARANTINE_TABLE))
    summary.distinct_prompts, summary.conflicting_ids = count_distinct_prompts(rows_path)
    return summary


def _refresh_views(lake: Lake, tables: tuple[str, ...] | list[str] = (USAGE_TABLE, QUARANTINE_TABLE)) -> str | None:
    try:
        for table in tables:
            lake.refresh_view(table)
    except (DuckDBLockTimeout, LakeFileError) as error:
        return f"rows committed; the catalog's views wait for a later write: {error}"
    return None


def quarantine_unreadable_file(lake: Lake, batch: str, path: Path, error: UnreadableLogFile) -> Path:
    """The one quarantine row of a file that could not be read at all (no line number, no raw text), then
    its empty usage_logs partition: committed like any batch, so the same file is never read again."""
    target = lake.path(QUARANTINE_TABLE, batch)
    with _partition_writer(target, QUARANTINE_SCHEMA, batch) as out:
        row = {"source_file": [str(path)], "line_number": [None], "reason": [str(error)], "raw": [""]}
        out.write(pa.table(row, schema=QUARANTINE_SCHEMA))
    with _partition_writer(lake.path(USAGE_TABLE, batch), USAGE_LOG_SCHEMA, batch):
        pass  # no rows: the commit
    _refresh_views(lake)
    return target


def ingest_file(path: Path, limits: DataSettings) -> IngestedBatch:
    """Read and validate a whole usage-log file into memory (tests, notebooks, small files).

    The same chunks as ingest_to_lake, which the pipeline uses to stream files of any size.
    Raises UnreadableLogFile if no row can be read at all.
    """
    chunks = list(read_log_chunks(path, limits))
    rows = pa.concat_tables([chunk.rows for chunk in chunks])
    quarantine = pa.concat_tables([chunk.quarantine for chunk in chunks])
    events = pa.concat_tables([chunk.events for chunk in chunks])
    return IngestedBatch(rows.to_pandas(), quarantine.to_pandas(), events.to_pandas())


def read_log_chunks(path: Path, limits: DataSettings, chunk_rows: int = CHUNK_ROWS) -> Iterator[IngestChunk]:
    """The file's good and quarantined rows, ``chunk_rows`` of them (both kinds) per chunk; at least one chunk."""
    digest = file_digest(path)
    received = datetime.now(UTC).replace(tzinfo=None)
    good, bad = _ColumnBuffer(USAGE_LOG_SCHEMA), _ColumnBuffer(QUARANTINE_SCHEMA)
    events = _ColumnBuffer(EVENTS_SCHEMA)
    for number, item in enumerate(read_records(path, limits), start=1):
        if isinstance(item, LogRow):
            good.add(_usage_row(item, digest, received))
        elif isinstance(item, LogEvent):
            events.add(_event_row(item, digest, received))
        else:
            bad.add(item)
        if number % chunk_rows == 0:
            yield IngestChunk(good.take(), bad.take(), events.take())
    yield IngestChunk(good.take(), bad.take(), events.take())


def count_distinct_prompts(usage_log_file: Path) -> tuple[int, int]:
    """Distinct prompt ids in a usage_logs Parquet file, and the external ids that name more than one
    distinct prompt there: counted exactly by DuckDB in bounded memory (one thread, a small memory
    limit, spilling to a temp folder beyond it)."""
    with tempfile.TemporaryDirectory(prefix="tao-distinct-") as spill:
        config = {"memory_limit": _DISTINCT_MEMORY_LIMIT, "threads": 1, "temp_directory": spill}
        with duckdb.connect(config=config) as con:
            prompts = con.execute("SELECT count(DISTINCT prompt_id) FROM read_parquet(?)", [str(usage_log_file)])
            distinct = int(prompts.fetchone()[0])
            conflicts = con.execute(
                "SELECT count(*) FROM (SELECT external_id FROM read_parquet(?) GROUP BY external_id "
                "HAVING count(DISTINCT prompt_id) > 1)",
                [str(usage_log_file)],
            )
            return distinct, int(conflicts.fetchone()[0])


class _ColumnBuffer:
    """Rows gathered column by column until a chunk is taken as an Arrow table."""

    def __init__(self, schema: pa.Schema) -> None:
        self._schema = schema
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}

    def add(self, row: dict[str, Any]) -> None:
        for name, values in self._columns.items():
            values.append(row[name])

    def take(self) -> pa.Table:
        table = pa.table(self._columns, schema=self._schema)
        self._columns = {name: [] for name in self._schema.names}
        return table


class _PartitionWriter:
    """Arrow chunks of one lake partition, each row tagged with its log batch."""

    def __init__(self, path: Path, schema: pa.Schema, batch: str) -> None:
        self._batch = batch
        self._writer = pq.ParquetWriter(str(path), schema.append(pa.field("batch", _TEXT)))

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            batch = pa.array([self._batch] * table.num_rows, _TEXT)
            self._writer.write_table(table.append_column("batch", batch))

    def close(self) -> None:
        self._writer.close()


@contextmanager
def _partition_writer(target: Path, schema: pa.Schema, batch: str) -> Iterator[_PartitionWriter]:
    """A partition written chunk by chunk; it replaces ``target`` only if the block finishes."""
    with atomic_path(target) as staging:
        writer = _PartitionWriter(staging, schema, batch)
        try:
            yield writer
        finally:
            writer.close()


def _usage_row(row: LogRow, digest: str, received: datetime) -> dict[str, Any]:
    return {
        "log_id": content_hash(digest, str(row.line_number)),
        "external_id": row.log_id,
        "prompt_id": prompt_id_for(row.prompt, row.system, row.constraints, row.history),
        "prompt": row.prompt.strip(),
        "system": row.system,
        "task": row.task,
        "constraints": row.constraints,
        "history": row.history,
        "left_out": row.left_out,
        **_answer_columns(row.answer),
        "source_file": row.source_file,
        "line_number": row.line_number,
        "received_at": received,
    }


def _event_row(event: LogEvent, digest: str, received: datetime) -> dict[str, Any]:
    return {
        "event_id": content_hash(digest, str(event.line_number)),
        "kind": event.kind,
        "external_id": event.external_id,
        **_answer_columns(event.answer),
        "source_file": event.source_file,
        "line_number": event.line_number,
        "received_at": received,
    }


def _answer_columns(answer: LoggedAnswer | None) -> dict[str, Any]:
    feedback = answer.feedback if answer is not None else None
    return {
        "response": answer.response if answer else None,
        "response_id": answer.response_id if answer else None,
        "response_model": answer.model if answer else None,
        "rating": feedback.rating if feedback else None,
        "comment": feedback.comment if feedback else None,
        "correction": feedback.correction if feedback else None,
        "live_arm": answer.live.arm if answer and answer.live else None,
        "live_pair": answer.live.pair if answer and answer.live else None,
        "latency_ms": answer.live.latency_ms if answer and answer.live else None,
        "answered_at": answer.live.answered_at if answer and answer.live else None,
    }

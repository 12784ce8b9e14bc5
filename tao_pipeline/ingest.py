"""Usage-log files (JSONL, JSON arrays, Parquet, CSV) -> rows of the usage_logs table, plus quarantined rows.

A file is identified by the hash of its content, so the same file is ingested once however
often it is seen. Each row gets a content-hash id (file hash + row number), the time it was
received and its source file; bad rows go to quarantine with the reason, and a file that
cannot be read at all raises UnreadableLogFile (reported once, never retried forever).

``ingest_to_lake`` streams: rows are read, validated and written CHUNK_ROWS at a time into a
temp file per table, renamed into place once the whole file has been read (every lake write is
atomic), so memory stays bounded however large the file is. The formats:

* ``.jsonl``, and ``.json`` that is not one JSON array: line by line, rows numbered by line;
* ``.json`` whose whole content is one JSON array: read whole (so at most MAX_JSON_ARRAY_BYTES;
  write bigger ones as JSONL), rows numbered 1, 2, ... by element;
* ``.parquet``: batch by batch, rows numbered by row; a float id that is a whole number
  (``3.0``, as pandas writes an integer column with nulls) is the id ``"3"``;
* ``.csv`` with a header line: row by row, rows numbered by row (blank lines skipped).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tao_pipeline.lake import Lake
from tao_pipeline.prompts import (
    LogRow,
    RowRejected,
    _quarantine,
    content_hash,
    parse_record,
    prompt_id_for,
    read_jsonl,
)
from tao_pipeline.settings import DataSettings, TaoSettings

LOG_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
USAGE_TABLE = "usage_logs"
QUARANTINE_TABLE = "quarantined_rows"
_TEXT = pa.large_string()  # what pandas' string columns become, as in the lake's other tables
USAGE_LOG_SCHEMA = pa.schema([
    ("log_id", _TEXT), ("external_id", _TEXT), ("prompt_id", _TEXT), ("prompt", _TEXT), ("system", _TEXT),
    ("task", _TEXT), ("constraints", _TEXT), ("source_file", _TEXT), ("line_number", pa.int64()),
    ("received_at", pa.timestamp("us")),
])
QUARANTINE_SCHEMA = pa.schema([("source_file", _TEXT), ("line_number", pa.int64()), ("reason", _TEXT), ("raw", _TEXT)])
USAGE_LOG_COLUMNS = USAGE_LOG_SCHEMA.names
CHUNK_ROWS = 50_000  # rows (good and quarantined) validated and written at a time
PARQUET_BATCH_ROWS = 5_000  # Parquet rows decoded into Python dicts at a time
MAX_JSON_ARRAY_BYTES = 64 * 2**20  # a JSON array file is parsed whole; bigger ones must be JSONL
QUARANTINE_PREVIEW_ROWS = 20
_DISTINCT_MEMORY_LIMIT = "32MB"  # counting distinct prompts spills to disk beyond this
_HASH_BLOCK = 1 << 20
_PARQUET_READ_BUFFER = 1 << 20
_SCAN_BLOCK = 1 << 16


class UnreadableLogFile(ValueError):
    """The whole file could not be parsed (wrong format, corrupt Parquet, unknown suffix)."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def batch_key(path: Path, digest: str | None = None) -> str:
    """A log batch's partition key: readable stem plus content hash, e.g. 'app-2026-11-3f2a9c1b04d2'."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.stem)[:40] or "logs"
    return f"{stem}-{(digest or file_digest(path))[:12]}"


def discover_log_files(folders: list[Path], files: list[Path]) -> list[Path]:
    """Log files directly inside the inbox folders, plus explicitly configured files."""
    found = [p for folder in folders if folder.is_dir() for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in LOG_SUFFIXES and not p.name.startswith(".")]
    return found + [Path(f) for f in files if Path(f).is_file()]


def pending_log_files(settings: TaoSettings, known_keys: set[str]) -> dict[str, Path]:
    """Pull new table rows (if a table source is set), then every log file not ingested yet, by key."""
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    source = settings.flywheel.table_source
    if source is not None:
        export_new_table_rows(source.database, source.table, source.order_column, settings.table_exports_dir)
    return new_log_files(discover_log_files(settings.log_folders, settings.data.logs), known_keys)


def new_log_files(paths: list[Path], known_keys: set[str]) -> dict[str, Path]:
    """Batch key -> file for files whose content was never ingested (a renamed copy is not new)."""
    seen = {key.rsplit("-", 1)[-1] for key in known_keys}
    new: dict[str, Path] = {}
    for path in paths:
        digest = file_digest(path)
        if digest[:12] not in seen:
            seen.add(digest[:12])
            new[batch_key(path, digest)] = path
    return new


@dataclass
class IngestChunk:
    """Up to CHUNK_ROWS rows of one file: the good ones (USAGE_LOG_SCHEMA) and the quarantined ones."""

    rows: pa.Table
    quarantine: pa.Table


@dataclass
class IngestedBatch:
    rows: pd.DataFrame
    quarantine: pd.DataFrame


@dataclass
class IngestSummary:
    """What ingest_to_lake wrote: counts and a preview of quarantine reasons, gathered chunk by chunk."""

    rows: int = 0
    quarantined: int = 0
    distinct_prompts: int = 0
    rows_per_task: Counter[str] = field(default_factory=Counter)
    quarantine_preview: list[tuple[int | None, str]] = field(default_factory=list)

    def add(self, chunk: IngestChunk) -> None:
        self.rows += chunk.rows.num_rows
        self.quarantined += chunk.quarantine.num_rows
        for counted in chunk.rows.column("task").value_counts().to_pylist():
            self.rows_per_task[counted["values"]] += counted["counts"]
        room = QUARANTINE_PREVIEW_ROWS - len(self.quarantine_preview)
        preview = chunk.quarantine.slice(0, max(room, 0))
        self.quarantine_preview += zip(preview["line_number"].to_pylist(), preview["reason"].to_pylist())

    def per_task(self) -> pd.DataFrame:
        return pd.DataFrame(sorted(self.rows_per_task.items()), columns=["task", "rows"])

    def quarantine_reasons(self) -> pd.DataFrame:
        return pd.DataFrame(self.quarantine_preview, columns=["line_number", "reason"])


def ingest_to_lake(path: Path, limits: DataSettings, lake: Lake, batch: str,
                   chunk_rows: int = CHUNK_ROWS) -> IngestSummary:
    """Stream one usage-log file into partition ``batch`` of usage_logs and quarantined_rows.

    Rows are validated and written chunk by chunk into temp files, renamed into place only once
    the whole file has been read: an UnreadableLogFile halfway (a corrupt Parquet page) leaves
    the lake as it was.
    """
    summary = IngestSummary()
    rows_out = _StagedPartition(lake, USAGE_TABLE, batch, USAGE_LOG_SCHEMA)
    quarantine_out = _StagedPartition(lake, QUARANTINE_TABLE, batch, QUARANTINE_SCHEMA)
    try:
        for chunk in read_log_chunks(path, limits, chunk_rows):
            rows_out.write(chunk.rows)
            quarantine_out.write(chunk.quarantine)
            summary.add(chunk)
        rows_path = rows_out.commit()
        quarantine_out.commit()
    finally:
        rows_out.discard()
        quarantine_out.discard()
    summary.distinct_prompts = count_distinct_prompts(rows_path)
    return summary


def quarantine_unreadable_file(lake: Lake, batch: str, path: Path, error: UnreadableLogFile) -> Path:
    """The one quarantine row of a file that could not be read at all (no line number, no raw text)."""
    staged = _StagedPartition(lake, QUARANTINE_TABLE, batch, QUARANTINE_SCHEMA)
    try:
        staged.write(pa.table({"source_file": [str(path)], "line_number": [None], "reason": [str(error)],
                               "raw": [""]}, schema=QUARANTINE_SCHEMA))
        return staged.commit()
    finally:
        staged.discard()


def ingest_file(path: Path, limits: DataSettings) -> IngestedBatch:
    """Read and validate a whole usage-log file into memory (tests, notebooks, small files).

    The same chunks as ingest_to_lake, which the pipeline uses to stream files of any size.
    Raises UnreadableLogFile if no row can be read at all.
    """
    chunks = list(read_log_chunks(path, limits))
    rows = pa.concat_tables([chunk.rows for chunk in chunks])
    quarantine = pa.concat_tables([chunk.quarantine for chunk in chunks])
    return IngestedBatch(rows.to_pandas(), quarantine.to_pandas())


def read_log_chunks(path: Path, limits: DataSettings, chunk_rows: int = CHUNK_ROWS) -> Iterator[IngestChunk]:
    """The file's good and quarantined rows, ``chunk_rows`` of them (both kinds) per chunk; at least one chunk."""
    digest = file_digest(path)
    received = datetime.now(timezone.utc).replace(tzinfo=None)
    good, bad = _ColumnBuffer(USAGE_LOG_SCHEMA), _ColumnBuffer(QUARANTINE_SCHEMA)
    for number, item in enumerate(_records(path, limits), start=1):
        if isinstance(item, LogRow):
            good.add(_usage_row(item, digest, received))
        else:
            bad.add(item)
        if number % chunk_rows == 0:
            yield IngestChunk(good.take(), bad.take())
    yield IngestChunk(good.take(), bad.take())


def count_distinct_prompts(usage_log_file: Path) -> int:
    """Distinct prompt ids in a usage_logs Parquet file, counted exactly by DuckDB in bounded memory
    (one thread, a small memory limit, spilling to a temp folder beyond it)."""
    with tempfile.TemporaryDirectory(prefix="tao-distinct-") as spill:
        config = {"memory_limit": _DISTINCT_MEMORY_LIMIT, "threads": 1, "temp_directory": spill}
        with duckdb.connect(config=config) as con:
            query = "SELECT count(DISTINCT prompt_id) FROM read_parquet(?)"
            return int(con.execute(query, [str(usage_log_file)]).fetchone()[0])


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


class _StagedPartition:
    """One lake partition written chunk by chunk into a temp file beside it; commit() renames it into
    place and refreshes the catalog view, discard() (a no-op after commit) removes the temp file."""

    def __init__(self, lake: Lake, table: str, partition: str, schema: pa.Schema) -> None:
        self._lake, self._table, self._partition = lake, table, partition
        self.target = lake.path(table, partition)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{partition}.", suffix=".tmp")
        os.close(fd)
        self._staging = Path(name)
        self._writer = pq.ParquetWriter(name, schema.append(pa.field("batch", _TEXT)))

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            batch = pa.array([self._partition] * table.num_rows, _TEXT)
            self._writer.write_table(table.append_column("batch", batch))

    def commit(self) -> Path:
        self._writer.close()
        os.replace(self._staging, self.target)
        self._lake.refresh_view(self._table)
        return self.target

    def discard(self) -> None:
        self._writer.close()
        self._staging.unlink(missing_ok=True)


def _usage_row(row: LogRow, digest: str, received: datetime) -> dict[str, Any]:
    return {
        "log_id": content_hash(digest, str(row.line_number)),
        "external_id": row.log_id,
        "prompt_id": prompt_id_for(row.prompt, row.system, row.constraints),
        "prompt": row.prompt.strip(), "system": row.system, "task": row.task, "constraints": row.constraints,
        "source_file": row.source_file, "line_number": row.line_number, "received_at": received,
    }


def _records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json" and (array := _json_array(path)) is not None:
        yield from _array_records(array, str(path), limits)
    elif suffix in (".jsonl", ".json"):
        yield from read_jsonl(path, limits)
    elif suffix == ".parquet":
        yield from _parquet_records(path, limits)
    elif suffix == ".csv":
        yield from _csv_records(path, limits)
    else:
        raise UnreadableLogFile(f"{path}: unsupported log format {suffix!r}; use one of {LOG_SUFFIXES}")


def _validated(record: Any, source: str, number: int, limits: DataSettings):
    try:
        return parse_record(record, source, number, limits)
    except RowRejected as error:
        return {"source_file": source, "line_number": number, "reason": str(error), "raw": _preview(record)}


def _preview(record: Any) -> str:
    try:
        return json.dumps(record, default=str)[:500]
    except (ValueError, RecursionError):  # a circular or too deeply nested value
        return repr(record)[:500]


def _json_array(path: Path) -> list[Any] | None:
    """The elements of a .json file whose whole content is one JSON array, or None (then it is read as JSONL).

    Arrays are parsed whole, so one over MAX_JSON_ARRAY_BYTES is refused: write it as JSONL.
    """
    if _first_json_byte(path) != b"[":
        return None
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise UnreadableLogFile(
            f"{path}: a JSON array file is read whole and this one is {size / 2**20:.0f} MiB, over the "
            f"{MAX_JSON_ARRAY_BYTES / 2**20:.0f} MiB limit; write it as JSONL (one object per line) instead")
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError):  # invalid UTF-8 or JSON, a huge integer, deep nesting: JSONL
        return None
    return value if isinstance(value, list) else None


def _first_json_byte(path: Path) -> bytes:
    """The file's first byte that is not a byte order mark or whitespace (b"" if there is none)."""
    with path.open("rb") as handle:
        pending = handle.read(3).removeprefix(codecs.BOM_UTF8)
        while True:
            text = pending.lstrip()
            if text:
                return text[:1]
            pending = handle.read(_SCAN_BLOCK)
            if not pending:
                return b""


def _array_records(records: list[Any], source: str, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    for number, record in enumerate(records, start=1):
        yield _validated(record, source, number, limits)


def _parquet_records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    try:  # read through a small buffer, one thread: a row group's column chunks are never all in memory
        parquet = pq.ParquetFile(path, buffer_size=_PARQUET_READ_BUFFER, pre_buffer=False)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise UnreadableLogFile(f"{path}: not a readable Parquet file: {error}") from error
    number = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, use_threads=False)
    while True:
        try:  # a corrupt page (bad compression, invalid UTF-8, ...) only shows up when its batch is decoded
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else []
        except Exception as error:
            raise UnreadableLogFile(f"{path}: not a readable Parquet file: {error}") from error
        if batch is None:
            return
        for record in records:
            number += 1
            yield _validated(_whole_float_id(_drop_nulls(record)), str(path), number, limits)


def _whole_float_id(record: dict[str, Any]) -> dict[str, Any]:
    """An id column of integers with nulls is stored as floats (pandas does so): 3.0 is the id 3.

    NaN, infinities and fractions stay floats, which parse_record quarantines with the value.
    """
    value = record.get("id")
    if isinstance(value, float) and value.is_integer():
        record["id"] = int(value)
    return record


def _csv_records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    """Rows of a CSV file with a header line, numbered 1, 2, ... like Parquet rows (blank lines skipped).

    A row that does not parse (a stray quote, a field over csv's size limit) or has the wrong number
    of fields is quarantined. When such a row swallowed several lines (an unclosed quote runs on to
    the next quote), only its first line is quarantined and reading resumes on the line after it.
    """
    source = str(path)
    # newline="": lines end at \n, \r\n or \r, and csv sees line breaks inside quoted fields unchanged
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        lines = _PushbackLines(handle)
        reader = csv.reader(lines, strict=True)
        header: list[str] | None = None
        number = 0
        while True:
            lines.taken = []
            problem = None
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                fields, problem = [], f"not valid CSV: {error}"
            if not lines.taken or (not fields and problem is None):
                continue  # blank line
            if header is None:
                if problem is not None or not all(map(_is_unicode, fields)):
                    raise UnreadableLogFile(f"{path}: not a readable CSV file: header line: {problem or 'not UTF-8'}")
                header = fields
                continue
            number += 1
            if problem is None and len(fields) != len(header):
                problem = "CSV row has the wrong number of fields"
            if problem is not None:
                taken = lines.taken
                lines.push_back(taken[1:])  # lines an unclosed quote swallowed are read again
                yield _quarantine(source, number, problem, _raw(taken[:1]))
            elif not all(map(_is_unicode, fields)):
                yield _quarantine(source, number, "line is not valid UTF-8", _raw(lines.taken))
            else:
                record: dict[str, str] = {}
                for name, value in zip(header, fields):
                    record.setdefault(name, value)  # a repeated column name: the first one counts
                yield _validated({k: v for k, v in record.items() if v != ""}, source, number, limits)
        if header is None:
            raise UnreadableLogFile(f"{path}: not a readable CSV file: no header line")


class _PushbackLines:
    """A text file's lines for csv.reader (bad UTF-8 kept as surrogate escapes), remembering the
    lines the current row took and accepting lines back to be read again."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self._again: list[str] = []
        self.taken: list[str] = []

    def __iter__(self) -> _PushbackLines:
        return self

    def __next__(self) -> str:
        if self._again:
            line = self._again.pop()
        else:
            line = self._handle.readline()
            if not line:
                raise StopIteration
        self.taken.append(line)
        return line

    def push_back(self, lines: list[str]) -> None:
        self._again.extend(reversed(lines))


def _raw(lines: list[str]) -> bytes:
    return "".join(lines).encode("utf-8", "surrogateescape")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _drop_nulls(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}


def export_new_table_rows(database: Path, table: str, order_column: str, export_dir: Path) -> Path | None:
    """Copy rows appended to a DuckDB table since the last export into a Parquet file for ingestion.

    The high-water mark of ``order_column`` is kept in ``<export_dir>/<table>.cursor`` and only
    advanced after the file is in place, so a crash re-exports the same rows into a file with
    the same content, which ingestion then recognises by its hash.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    cursor_file = export_dir / f"{table}.cursor"
    after = cursor_file.read_text().strip() if cursor_file.exists() else None
    if not Path(database).is_file():
        raise FileNotFoundError(f"flywheel.table_source.database {str(database)!r} does not exist")
    where = f'WHERE "{order_column}" > ?' if after is not None else ""
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(f'SELECT * FROM {_quoted(table)} {where} ORDER BY "{order_column}"',
                           [after] if after is not None else []).df()
    if rows.empty:
        return None
    high = str(rows[order_column].iloc[-1])
    target = export_dir / f"{table}-{content_hash(str(after), high)}.parquet"
    staging = target.with_suffix(".tmp")
    rows.to_parquet(staging, index=False)
    os.replace(staging, target)
    cursor_file.write_text(high)
    return target


def _quoted(table: str) -> str:
    return ".".join(f'"{part}"' for part in table.split("."))


def archive_file(path: Path, inbox: Path, outcome: str) -> Path | None:
    """Move an inbox file to inbox/<outcome>/ once handled; configured files elsewhere stay put."""
    if path.parent.resolve() != inbox.resolve():
        return None
    target_dir = inbox / outcome
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    if target.exists():
        target = target_dir / f"{path.stem}-{file_digest(path)[:8]}{path.suffix}"
    shutil.move(str(path), target)
    return target

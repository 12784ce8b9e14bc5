"""Usage-log files (JSONL, Parquet, CSV) -> rows of the usage_logs table, plus quarantined rows.

A file is identified by the hash of its content, so the same file is ingested once however
often it is seen. Each row gets a content-hash id (file hash + row number), the time it was
received and its source file; bad rows go to quarantine with the reason, and a file that
cannot be read at all raises UnreadableLogFile (reported once, never retried forever).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from tao_pipeline.prompts import (
    QUARANTINE_COLUMNS,
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
USAGE_LOG_COLUMNS = [
    "log_id", "external_id", "prompt_id", "prompt", "system", "task", "constraints",
    "source_file", "line_number", "received_at",
]
_CHUNK_ROWS = 50_000
_HASH_BLOCK = 1 << 20


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
class IngestedBatch:
    rows: pd.DataFrame
    quarantine: pd.DataFrame


def ingest_file(path: Path, limits: DataSettings) -> IngestedBatch:
    """Read and validate one usage-log file; raise UnreadableLogFile if no row can be read at all."""
    digest = file_digest(path)
    received = datetime.now(timezone.utc).replace(tzinfo=None)
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for item in _records(path, limits):
        if isinstance(item, LogRow):
            good.append(_usage_row(item, digest, received))
        else:
            bad.append(item)
    return IngestedBatch(
        pd.DataFrame(good, columns=USAGE_LOG_COLUMNS),
        pd.DataFrame(bad, columns=QUARANTINE_COLUMNS),
    )


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
    if suffix in (".jsonl", ".json"):
        yield from read_jsonl(path, limits)
    elif suffix == ".parquet":
        yield from _parquet_records(path, limits)
    elif suffix == ".csv":
        yield from _csv_records(path, limits)
    else:
        raise UnreadableLogFile(f"{path}: unsupported log format {suffix!r}; use one of {LOG_SUFFIXES}")


def _validated(record: dict[str, Any], source: str, number: int, limits: DataSettings):
    try:
        return parse_record(record, source, number, limits)
    except RowRejected as error:
        raw = json.dumps(record, default=str)[:500]
        return {"source_file": source, "line_number": number, "reason": str(error), "raw": raw}


def _parquet_records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise UnreadableLogFile(f"{path}: not a readable Parquet file: {error}") from error
    number = 0
    batches = parquet.iter_batches(batch_size=_CHUNK_ROWS)
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
            yield _validated(_drop_nulls(record), str(path), number, limits)


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

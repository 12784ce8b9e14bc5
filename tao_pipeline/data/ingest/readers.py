"""Readers for each usage-log format: the file's records, each a valid row or a quarantine record.

* ``.jsonl``, and ``.json`` that is not one JSON array: line by line, rows numbered by line;
* ``.json`` whose whole content is one JSON array: read whole (so at most MAX_JSON_ARRAY_BYTES;
  write bigger ones as JSONL), rows numbered 1, 2, ... by element;
* ``.parquet``: batch by batch, rows numbered by row; a float id that is a whole number
  (``3.0``, as pandas writes an integer column with nulls) is the id ``"3"``;
* ``.csv`` with a header line: row by row, rows numbered by row (blank lines skipped).

Lines end at ``\n``, ``\r\n`` or a lone ``\r``. Any of these compressed with gzip (``.jsonl.gz``,
``.csv.gz``, ..., or a gzip file under a plain name: it is recognised by its first bytes) is
read through the decompressor, still streaming. A file that cannot be read at all raises
UnreadableLogFile.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from tao_pipeline.data.ingest.validation import LogRow, RowRejected, parse_record, quarantine_record, validated
from tao_pipeline.settings import DataSettings

FORMATS = (".jsonl", ".json", ".parquet", ".csv")
LOG_SUFFIXES = (*FORMATS, *(f"{suffix}.gz" for suffix in FORMATS))
GZIP_MAGIC = b"\x1f\x8b\x08"  # gzip's two magic bytes and its one compression method (deflate)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
PARQUET_BATCH_ROWS = 5_000  # Parquet rows decoded into Python dicts at a time
MAX_JSON_ARRAY_BYTES = 64 * 2**20  # a JSON array file is parsed whole; bigger ones must be JSONL
_PARQUET_READ_BUFFER = 1 << 20
_SCAN_BLOCK = 1 << 16


class UnreadableLogFile(ValueError):
    """The whole file could not be parsed (wrong format, corrupt Parquet, unknown suffix)."""


def log_format(path: Path) -> str:
    """The format a file's name says (``.jsonl`` for ``app.jsonl.gz``), or UnreadableLogFile."""
    name = path.name.lower().removesuffix(".gz")
    suffix = next((s for s in FORMATS if name.endswith(s)), None)
    if suffix is None:
        raise UnreadableLogFile(f"{path}: unsupported log format {path.suffix!r}; use one of {LOG_SUFFIXES}")
    return suffix


def is_gzip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC


@contextmanager
def open_log(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when it is gzip (whatever its name)."""
    if is_gzip(path):
        with gzip.open(path, "rb") as handle:
            yield handle
    else:
        with path.open("rb") as handle:
            yield handle


def read_records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    """Every record of a log file in order: a LogRow per good row, a quarantine record per bad one."""
    suffix = log_format(path)
    try:
        yield from _records(path, suffix, limits)
    except (gzip.BadGzipFile, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError) or not is_gzip(path):
            raise
        raise UnreadableLogFile(f"{path}: not a readable gzip file: {error}") from error


def _records(path: Path, suffix: str, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    if suffix == ".json" and (array := _json_array(path)) is not None:
        yield from _array_records(array, str(path), limits)
    elif suffix in (".jsonl", ".json"):
        yield from read_jsonl(path, limits)
    elif suffix == ".parquet":
        yield from _parquet_records(path, limits)
    else:
        yield from _csv_records(path, limits)


def read_jsonl(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    """Yield a LogRow per good line and a quarantine record per bad one."""
    source = str(path)
    with open_log(path) as handle:
        for line_number, raw in enumerate(_lines(handle), start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is not data
                yield parse_record(json.loads(text), source, line_number, limits)
            except UnicodeDecodeError:
                yield quarantine_record(source, line_number, "line is not valid UTF-8", raw)
            except json.JSONDecodeError as error:
                yield quarantine_record(source, line_number, f"not valid JSON: {error.msg}", raw)
            except RecursionError:
                yield quarantine_record(source, line_number, "JSON nested too deeply", raw)
            except RowRejected as error:
                yield quarantine_record(source, line_number, str(error), raw)
            except ValueError as error:  # json.loads beyond JSONDecodeError: an integer of > 4300 digits
                yield quarantine_record(source, line_number, f"not valid JSON: {error}", raw)


def _lines(handle: IO[bytes], block: int = _SCAN_BLOCK) -> Iterator[bytes]:
    """The lines of a binary stream, without their ends, split at \\n, \\r\\n or a lone \\r."""
    pending = b""
    while chunk := handle.read(block):
        pending += chunk
        # A \r at the very end may be the first half of a \r\n: it waits for the next block.
        cut = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
        parts = _LINE_BREAK.split(pending[:cut])
        pending = parts.pop() + pending[cut:]
        yield from parts
    if pending.endswith(b"\r"):
        yield pending[:-1]  # a last line ended by a lone \r
    elif pending:
        yield pending  # a last line without an end


def _json_array(path: Path) -> list[Any] | None:
    """The elements of a .json file whose whole content is one JSON array, or None (then it is read as JSONL).

    Arrays are parsed whole, so one over MAX_JSON_ARRAY_BYTES is refused: write it as JSONL.
    """
    if _first_json_byte(path) != b"[":
        return None
    with open_log(path) as handle:
        content = handle.read(MAX_JSON_ARRAY_BYTES + 1)
    if len(content) > MAX_JSON_ARRAY_BYTES:
        raise UnreadableLogFile(
            f"{path}: a JSON array file is read whole and this one is over the "
            f"{MAX_JSON_ARRAY_BYTES / 2**20:.0f} MiB limit; write it as JSONL (one object per line) instead"
        )
    try:
        value = json.loads(content.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # invalid UTF-8 or JSON, a huge integer, deep nesting: JSONL
        return None
    return value if isinstance(value, list) else None


def _first_json_byte(path: Path) -> bytes:
    """The file's first byte that is not a byte order mark or whitespace (b"" if there is none)."""
    with open_log(path) as handle:
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
        yield validated(record, source, number, limits)


def _parquet_records(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    if is_gzip(path):  # Parquet needs to seek: decompressed into a temp file first
        with tempfile.NamedTemporaryFile(suffix=".parquet") as plain:
            with gzip.open(path, "rb") as compressed:
                shutil.copyfileobj(compressed, plain)
            plain.flush()
            yield from _parquet_rows(Path(plain.name), str(path), limits)
        return
    yield from _parquet_rows(path, str(path), limits)


def _parquet_rows(path: Path, source: str, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
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
            yield validated(_whole_float_id(_drop_nulls(record)), source, number, limits)


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
    with (
        open_log(path) as binary,
        io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle,
    ):
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
                yield quarantine_record(source, number, problem, _raw(taken[:1]))
            elif not all(map(_is_unicode, fields)):
                yield quarantine_record(source, number, "line is not valid UTF-8", _raw(lines.taken))
            else:
                record: dict[str, str] = {}
                for name, value in zip(header, fields):
                    record.setdefault(name, value)  # a repeated column name: the first one counts
                yield validated({k: v for k, v in record.items() if v != ""}, source, number, limits)
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

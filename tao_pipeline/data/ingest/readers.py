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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from tao_pipeline.common.safe_files import UnsafePathError, open_regular_file
from tao_pipeline.data.ingest.validation import (
    LogEvent,
    LogRow,
    RowRejected,
    parse_record,
    quarantine_record,
    validated,
)
from tao_pipeline.settings import DataSettings

FORMATS = (".jsonl", ".json", ".parquet", ".csv")
LOG_SUFFIXES = (*FORMATS, *(f"{suffix}.gz" for suffix in FORMATS))
GZIP_MAGIC = b"\x1f\x8b\x08"  # gzip's two magic bytes and its one compression method (deflate)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
PARQUET_BATCH_ROWS = 5_000  # Parquet rows decoded into Python dicts at a time
MAX_JSON_ARRAY_BYTES = 64 * 2**20  # a JSON array file is parsed whole; bigger ones must be JSONL
_PARQUET_READ_BUFFER = 1 << 20
_SCAN_BLOCK = 1 << 16
_OVERSIZED_HEAD_BYTES = 512  # kept of a line over the limit: enough for its quarantine preview


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
    with open_regular_file(path) as handle:
        return handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC


@contextmanager
def open_log(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when it is gzip (whatever its name); only a regular file with
    one link is opened (never a link, a FIFO or a hard link to a file elsewhere)."""
    with open_regular_file(path) as raw:
        if raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC:
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                yield handle
        else:
            raw.seek(0)
            yield raw


def read_records(path: Path, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    """Every record of a log file in order: a LogRow per good row, a quarantine record per bad one."""
    suffix = log_format(path)
    try:
        yield from _records(path, suffix, limits)
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as error:  # zlib.error: a corrupt deflate stream
        if isinstance(error, FileNotFoundError | UnsafePathError) or not is_gzip(path):
            raise
        raise UnreadableLogFile(f"{path}: not a readable gzip file: {error}") from error


def _records(path: Path, suffix: str, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    if suffix == ".json" and (array := _json_array(path)) is not None:
        yield from _array_records(array, str(path), limits)
    elif suffix in (".jsonl", ".json"):
        yield from read_jsonl(path, limits)
    elif suffix == ".parquet":
        yield from _parquet_records(path, limits)
    else:
        yield from _csv_records(path, limits)


def read_jsonl(path: Path, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    """Yield a LogRow per good line and a quarantine record per bad one."""
    source = str(path)
    with open_log(path) as handle:
        for line_number, line in enumerate(_lines(handle, limits.max_line_bytes), start=1):
            if isinstance(line, OversizedLine):
                yield quarantine_record(source, line_number, line.reason(), line.head)
                continue
            if not line.strip():
                continue
            yield _jsonl_record(line, source, line_number, limits)


def _jsonl_record(
    raw: bytes, source: str, line_number: int, limits: DataSettings
) -> LogRow | LogEvent | dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is not data
        return parse_record(json.loads(text), source, line_number, limits)
    except UnicodeDecodeError:
        return quarantine_record(source, line_number, "line is not valid UTF-8", raw)
    except json.JSONDecodeError as error:
        return quarantine_record(source, line_number, f"not valid JSON: {error.msg}", raw)
    except RecursionError:
        return quarantine_record(source, line_number, "JSON nested too deeply", raw)
    except RowRejected as error:
        return quarantine_record(source, line_number, str(error), raw)
    except ValueError as error:  # json.loads beyond JSONDecodeError: an integer of > 4300 digits
        return quarantine_record(source, line_number, f"not valid JSON: {error}", raw)


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than data.max_line_bytes: only its first bytes were kept, the rest skipped unread."""

    head: bytes
    size: int
    limit: int

    def reason(self) -> str:
        return f"line too long: {self.size} bytes > data.max_line_bytes={self.limit} (skipped unparsed)"


def _lines(handle: IO[bytes], max_bytes: int, block: int = _SCAN_BLOCK) -> Iterator[bytes | OversizedLine]:
    """The lines of a binary stream, without their ends, split at \\n, \\r\\n or a lone \\r.

    Linear in the stream's size however long a line is: each block is searched for line breaks once,
    and a line over ``max_bytes`` keeps only its first bytes (an OversizedLine) while the rest of it
    is counted and dropped.
    """
    line = _LineBuffer(max_bytes)
    after_cr = False  # the previous block ended with \r, which ended a line; a \n now belongs to it
    while chunk := handle.read(block):
        start = 1 if after_cr and chunk.startswith(b"\n") else 0
        for match in _LINE_BREAK.finditer(chunk, start):
            line.add(chunk[start : match.start()])
            yield line.take()
            start = match.end()
        line.add(chunk[start:])
        after_cr = chunk.endswith(b"\r")
    if line.size:
        yield line.take()  # a last line without an end


class _LineBuffer:
    """The pieces of the line being read, up to a limit; beyond it only their sizes are counted."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pieces: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        kept = max(0, self.max_bytes + 1 - self.size)  # one byte over the limit marks the line as oversized
        if kept:
            self.pieces.append(piece[:kept])
        self.size += len(piece)

    def take(self) -> bytes | OversizedLine:
        joined, size = b"".join(self.pieces), self.size
        self.pieces, self.size = [], 0
        if size > self.max_bytes:
            return OversizedLine(joined[:_OVERSIZED_HEAD_BYTES], size, self.max_bytes)
        return joined


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


def _array_records(
    records: list[Any], source: str, limits: DataSettings
) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    for number, record in enumerate(records, start=1):
        yield validated(record, source, number, limits)


def _parquet_records(path: Path, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    if is_gzip(path):  # Parquet needs to seek: decompressed into a temp file first
        with tempfile.NamedTemporaryFile(suffix=".parquet") as plain:
            with open_log(path) as compressed:
                shutil.copyfileobj(compressed, plain)
            plain.flush()
            yield from _parquet_rows(Path(plain.name), str(path), limits)
        return
    yield from _parquet_rows(path, str(path), limits)


def _parquet_rows(path: Path, source: str, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    with open_regular_file(path) as handle:
        yield from _parquet_file_rows(handle, path, source, limits)


def _parquet_file_rows(handle: IO[bytes], path: Path, source: str, limits: DataSettings):
    try:  # read through a small buffer, one thread: a row group's column chunks are never all in memory
        parquet = pq.ParquetFile(handle, buffer_size=_PARQUET_READ_BUFFER, pre_buffer=False)
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


def _csv_records(path: Path, limits: DataSettings) -> Iterator[LogRow | LogEvent | dict[str, Any]]:
    """Rows of a CSV file with a header line, numbered 1, 2, ... like Parquet rows (blank lines skipped).

    A row that does not parse (a stray quote, a field over csv's size limit, a line over
    data.max_line_bytes characters) or has the wrong number of fields is quarantined. When such a row
    swallowed several lines (an unclosed quote runs on to the next quote), only its first line is
    quarantined and reading resumes on the line after it.
    """
    source = str(path)
    # newline="": lines end at \n, \r\n or \r, and csv sees line breaks inside quoted fields unchanged
    with (
        open_log(path) as binary,
        io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle,
    ):
        lines = _PushbackLines(handle, limits.max_line_bytes)
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
            if lines.oversized() is not None:
                fields, problem = [], lines.oversized()
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


@dataclass(frozen=True)
class _TextLine:
    text: str
    size: int  # characters of the whole line; more than text holds when it was over the limit


class _PushbackLines:
    """A text file's lines for csv.reader (bad UTF-8 kept as surrogate escapes), remembering the
    lines the current row took and accepting lines back to be read again. A line over ``max_chars``
    is cut there and the rest of it skipped in linear time; the row that took it is quarantined."""

    def __init__(self, handle, max_chars: int) -> None:
        self._handle = handle
        self._max_chars = max_chars
        self._again: list[_TextLine] = []
        self.taken: list[_TextLine] = []

    def __iter__(self) -> _PushbackLines:
        return self

    def __next__(self) -> str:
        line = self._again.pop() if self._again else self._read_line()
        if line is None:
            raise StopIteration
        self.taken.append(line)
        return line.text

    def _read_line(self) -> _TextLine | None:
        text = self._handle.readline(self._max_chars + 1)
        if not text:
            return None
        size = len(text)
        if size > self._max_chars and not text.endswith(("\n", "\r")):
            while (rest := self._handle.readline(_SCAN_BLOCK)) and not rest.endswith(("\n", "\r")):
                size += len(rest)
            size += len(rest)
            text = text[: self._max_chars] + "\n"
        return _TextLine(text, size)

    def oversized(self) -> str | None:
        """Why the current row is refused for a line over the limit, or None."""
        longest = max((line.size for line in self.taken), default=0)
        if longest <= self._max_chars:
            return None
        return f"line too long: {longest} characters > data.max_line_bytes={self._max_chars} (skipped unparsed)"

    def push_back(self, lines: list[_TextLine]) -> None:
        self._again.extend(reversed(lines))


def _raw(lines: list[_TextLine]) -> bytes:
    return "".join(line.text for line in lines).encode("utf-8", "surrogateescape")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _drop_nulls(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}

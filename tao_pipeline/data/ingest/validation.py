"""One usage-log record -> a valid row, or the reason it is quarantined.

A bad row never stops the others: readers turn it into a quarantine record with the reason and
a preview of the raw text, and the good rows go on.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Any

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.data.prompts import DEFAULT_TASK
from tao_pipeline.settings import DataSettings

QUARANTINE_COLUMNS = ["source_file", "line_number", "reason", "raw"]
_RAW_PREVIEW_CHARS = 500
MAX_ID_CHARS = 1024  # an external id is a key, not content
MAX_TASK_CHARS = 200  # a task names scorers and a report's rows
MAX_CONSTRAINTS_CHARS = 64 * 1024  # a row's per-prompt checks, as canonical JSON
# Control (Cc: NUL, ...), format (Cf: zero-width spaces and joiners, the BOM, bidi marks) and
# separator characters show nothing: a prompt made only of them is empty.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible_text(text: str) -> str:
    """The characters of ``text`` that show something."""
    return "".join(char for char in text if unicodedata.category(char) not in _INVISIBLE)


@dataclass(frozen=True)
class LogRow:
    log_id: str
    prompt: str
    system: str | None
    task: str
    source_file: str
    line_number: int
    constraints: str | None = None  # canonical JSON of the row's per-prompt checks


class RowRejected(ValueError):
    """The reason a log row was quarantined."""


def _optional_text(record: dict[str, Any], field: str) -> str | None:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string, got {type(value).__name__}")
    _check_unicode(value, field)
    return value


def _check_unicode(value: str, field: str) -> None:
    """JSON escapes can smuggle in lone surrogates, which cannot be hashed or written to Parquet."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowRejected(f"field {field!r} is not valid Unicode: {error.reason}") from None


def _described(value: Any) -> str:
    """A wrong-typed value's type, and the value itself for a float (nan, 2.5) since it may be a near miss."""
    return f"float {value!r}" if isinstance(value, float) else type(value).__name__


def parse_record(record: Any, source: str, line_number: int, limits: DataSettings) -> LogRow:
    """Validate one decoded JSON value as a usage-log row."""
    if not isinstance(record, dict):
        raise RowRejected(f"row must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise RowRejected("missing required field 'prompt'")
    prompt = _optional_text(record, "prompt") or ""
    if len(prompt.strip()) < limits.min_prompt_chars:
        raise RowRejected("prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise RowRejected(f"prompt too long: {len(prompt)} chars > data.max_prompt_chars={limits.max_prompt_chars}")
    if len(visible_text(prompt)) < limits.min_prompt_chars:
        raise RowRejected("prompt is empty once invisible characters are removed (zero-width, BOM, control)")
    system = _optional_text(record, "system")
    if system is not None and len(system) > limits.max_system_chars:
        raise RowRejected(
            f"system message too long: {len(system)} chars > data.max_system_chars={limits.max_system_chars}"
        )
    task = (_optional_text(record, "task") or DEFAULT_TASK).strip() or DEFAULT_TASK
    if len(task) > MAX_TASK_CHARS:
        raise RowRejected(f"field 'task' too long: {len(task)} chars > {MAX_TASK_CHARS}")
    raw_id = record.get("id")
    if raw_id is not None and (not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool)):
        raise RowRejected(f"field 'id' must be a string or integer, got {_described(raw_id)}")
    if isinstance(raw_id, str):
        _check_unicode(raw_id, "id")
        if len(raw_id) > MAX_ID_CHARS:
            raise RowRejected(f"field 'id' too long: {len(raw_id)} chars > {MAX_ID_CHARS}")
    log_id = str(raw_id) if raw_id is not None else content_hash(source, str(line_number))
    constraints = record.get("constraints")
    if constraints is not None and not isinstance(constraints, dict):
        raise RowRejected(f"field 'constraints' must be a JSON object, got {type(constraints).__name__}")
    try:
        canonical = json.dumps(constraints, sort_keys=True) if constraints else None
    except (TypeError, ValueError, RecursionError) as error:  # e.g. bytes or timestamps in a Parquet struct
        raise RowRejected(f"field 'constraints' is not JSON-serialisable: {error}") from None
    if canonical is not None and len(canonical) > MAX_CONSTRAINTS_CHARS:
        raise RowRejected(f"field 'constraints' too long: {len(canonical)} chars of JSON > {MAX_CONSTRAINTS_CHARS}")
    return LogRow(log_id, prompt, system, task, source, line_number, canonical)


def validated(record: Any, source: str, number: int, limits: DataSettings) -> LogRow | dict[str, Any]:
    """A decoded record as a LogRow, or its quarantine record."""
    try:
        return parse_record(record, source, number, limits)
    except RowRejected as error:
        return {"source_file": source, "line_number": number, "reason": str(error), "raw": _preview(record)}


def quarantine_record(source: str, line_number: int, reason: str, raw: bytes) -> dict[str, Any]:
    """The quarantine row of a line that could not be decoded: the reason and the start of its bytes."""
    preview = raw[:_RAW_PREVIEW_CHARS].decode("utf-8", errors="replace").rstrip("\n")
    return {"source_file": source, "line_number": line_number, "reason": reason, "raw": preview}


def _preview(record: Any) -> str:
    try:
        return json.dumps(record, default=str)[:_RAW_PREVIEW_CHARS]
    except (ValueError, RecursionError):  # a circular or too deeply nested value
        return repr(record)[:_RAW_PREVIEW_CHARS]

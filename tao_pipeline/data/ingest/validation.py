"""One usage-log record -> a valid row, or the reason it is quarantined.

A bad row never stops the others: readers turn it into a quarantine record with the reason and
a preview of the raw text, and the good rows go on.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.data.conversation import ConversationRejected, from_messages
from tao_pipeline.data.feedback import Feedback, FeedbackRejected, parse_feedback
from tao_pipeline.data.ingest.formats import RowFormatError, canonical_record
from tao_pipeline.data.prompts import DEFAULT_TASK
from tao_pipeline.settings import DataSettings

QUARANTINE_COLUMNS = ["source_file", "line_number", "reason", "raw"]
_RAW_PREVIEW_CHARS = 500
MAX_ID_CHARS = 1024  # an external id is a key, not content
MAX_TASK_CHARS = 200  # a task names scorers and a report's rows
MAX_CONSTRAINTS_CHARS = 64 * 1024  # a row's per-prompt checks, as canonical JSON
MAX_RESPONSE_CHARS = 256 * 1024  # a logged answer: far beyond what a round generates
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
    history: str | None = None  # earlier turns of a conversation, as canonical JSON
    left_out: str | None = None  # what the model cannot take and was left out: "image_url part: 1"
    answer: LoggedAnswer | None = None  # the answer the app gave, and what its user did with it


@dataclass(frozen=True)
class LoggedAnswer:
    """A response an app already served (with the model version that wrote it), and its feedback."""

    response: str | None = None
    response_id: str | None = None
    model: str | None = None
    feedback: Feedback | None = None
    live: LiveServing | None = None


@dataclass(frozen=True)
class LiveServing:
    """How ``tao serve`` served the answer while a live experiment ran (tao_pipeline/live/)."""

    arm: str  # "champion", "canary" or "shadow" (answered in the background, never returned)
    pair: str | None = None  # a shadow answer's champion answer (its response id)
    latency_ms: float | None = None
    answered_at: datetime | None = None  # the server's clock (UTC), from the row's ``received_at``


@dataclass(frozen=True)
class LogEvent:
    """A row that is not a prompt: feedback on a response served earlier, or a Batch API output line
    (the answer to the input row with the same external id)."""

    kind: str  # "feedback" or "response"
    external_id: str | None
    answer: LoggedAnswer
    source_file: str
    line_number: int


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


def parse_record(record: Any, source: str, line_number: int, limits: DataSettings) -> LogRow | LogEvent:
    """Validate one decoded JSON value, in any log format ingestion knows, as a usage-log row or an event."""
    if not isinstance(record, dict):
        raise RowRejected(f"row must be a JSON object, got {type(record).__name__}")
    try:
        record = canonical_record(record, limits.mapping)
    except RowFormatError as error:
        raise RowRejected(str(error)) from None
    answer = _logged_answer(record)
    if "prompt" not in record and "messages" not in record:
        if answer is not None:
            kind, external_id = "response" if answer.response is not None else "feedback", _external_id(record, None)
            if kind == "response" and external_id is None:
                raise RowRejected("a response without a prompt needs the 'id' (custom_id) of the row that asked it")
            return LogEvent(kind, external_id, answer, source, line_number)
        raise RowRejected("missing required field 'prompt' (or 'messages', as in an OpenAI chat request)")
    system, history, left_out = None, None, None
    if "messages" in record:
        try:
            conversation = from_messages(record["messages"], limits)
        except ConversationRejected as error:
            raise RowRejected(str(error)) from None
        prompt, system, history = conversation.prompt, conversation.system, conversation.history_json
        left_out = conversation.left_out_text()
        _check_prompt(prompt, limits)
    else:
        prompt = _optional_text(record, "prompt") or ""
        _check_prompt(prompt, limits)
        system = _optional_text(record, "system")
    if system is not None and len(system) > limits.max_system_chars:
        raise RowRejected(
            f"system message too long: {len(system)} chars > data.max_system_chars={limits.max_system_chars}"
        )
    task = (_optional_text(record, "task") or DEFAULT_TASK).strip() or DEFAULT_TASK
    if len(task) > MAX_TASK_CHARS:
        raise RowRejected(f"field 'task' too long: {len(task)} chars > {MAX_TASK_CHARS}")
    log_id = _external_id(record, content_hash(source, str(line_number)))
    constraints = _constraints(record.get("constraints"))
    return LogRow(log_id, prompt, system, task, source, line_number, constraints, history, left_out, answer)


def _check_prompt(prompt: str, limits: DataSettings) -> None:
    if len(prompt.strip()) < limits.min_prompt_chars:
        raise RowRejected("prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise RowRejected(f"prompt too long: {len(prompt)} chars > data.max_prompt_chars={limits.max_prompt_chars}")
    if len(visible_text(prompt)) < limits.min_prompt_chars:
        raise RowRejected("prompt is empty once invisible characters are removed (zero-width, BOM, control)")


def _external_id(record: dict[str, Any], default: str | None) -> str | None:
    raw_id = record.get("id")
    if raw_id is not None and (not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool)):
        raise RowRejected(f"field 'id' must be a string or integer, got {_described(raw_id)}")
    if isinstance(raw_id, str):
        _check_unicode(raw_id, "id")
        if len(raw_id) > MAX_ID_CHARS:
            raise RowRejected(f"field 'id' too long: {len(raw_id)} chars > {MAX_ID_CHARS}")
    return str(raw_id) if raw_id is not None else default


def _constraints(constraints: Any) -> str | None:
    if constraints is not None and not isinstance(constraints, dict):
        raise RowRejected(f"field 'constraints' must be a JSON object, got {type(constraints).__name__}")
    try:
        canonical = json.dumps(constraints, sort_keys=True) if constraints else None
    except (TypeError, ValueError, RecursionError) as error:  # e.g. bytes or timestamps in a Parquet struct
        raise RowRejected(f"field 'constraints' is not JSON-serialisable: {error}") from None
    if canonical is not None and len(canonical) > MAX_CONSTRAINTS_CHARS:
        raise RowRejected(f"field 'constraints' too long: {len(canonical)} chars of JSON > {MAX_CONSTRAINTS_CHARS}")
    return canonical


def _logged_answer(record: dict[str, Any]) -> LoggedAnswer | None:
    """The answer already given in the row (text, id, model version) and its feedback, or None."""
    response = _optional_text(record, "response")
    if response is not None and len(response) > MAX_RESPONSE_CHARS:
        raise RowRejected(f"field 'response' too long: {len(response)} chars > {MAX_RESPONSE_CHARS}")
    response_id, model = _optional_text(record, "response_id"), _optional_text(record, "model")
    for field, value in (("response_id", response_id), ("model", model)):
        if value is not None and len(value) > MAX_ID_CHARS:
            raise RowRejected(f"field {field!r} too long: {len(value)} chars > {MAX_ID_CHARS}")
    feedback = None
    if record.get("feedback") is not None:
        try:
            feedback = parse_feedback(record["feedback"])
        except FeedbackRejected as error:
            raise RowRejected(str(error)) from None
    if response is None and feedback is None:
        return None
    if response is None and response_id is None and "prompt" not in record and "messages" not in record:
        raise RowRejected("feedback without a 'response_id': there is no answer it rates")
    return LoggedAnswer(response, response_id, model, feedback, _live_serving(record))


LIVE_ARMS = ("champion", "canary", "shadow")


def _live_serving(record: dict[str, Any]) -> LiveServing | None:
    arm = record.get("live_arm")
    if arm is None:
        return None
    if arm not in LIVE_ARMS:
        raise RowRejected(f"field 'live_arm' must be one of {', '.join(LIVE_ARMS)}, got {str(arm)[:40]!r}")
    pair = _optional_text(record, "live_pair")
    if pair is not None and len(pair) > MAX_ID_CHARS:
        raise RowRejected(f"field 'live_pair' too long: {len(pair)} chars > {MAX_ID_CHARS}")
    latency = record.get("latency_ms")
    if latency is not None and (
        isinstance(latency, bool) or not isinstance(latency, int | float) or not 0 <= latency < 1e9
    ):
        raise RowRejected(f"field 'latency_ms' must be a number of milliseconds, got {str(latency)[:40]!r}")
    return LiveServing(arm, pair, None if latency is None else float(latency), _answered_at(record.get("received_at")))


def _answered_at(value: Any) -> datetime | None:
    """The time a serve row was written (ISO 8601), as naive UTC; None when absent or unreadable (the
    row is still good: its ingestion time stands in)."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def validated(record: Any, source: str, number: int, limits: DataSettings) -> LogRow | LogEvent | dict[str, Any]:
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

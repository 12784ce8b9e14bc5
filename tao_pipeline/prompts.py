"""Usage logs -> validated, deduplicated prompts with a deterministic train/held-out split.

A bad row never stops the others: it goes to the quarantine table with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from tao_pipeline.settings import DataSettings

DEFAULT_TASK = "general"
_RAW_PREVIEW_CHARS = 500

PROMPT_COLUMNS = ["prompt_id", "prompt", "system", "task", "constraints", "split", "log_ids", "source_files"]
QUARANTINE_COLUMNS = ["source_file", "line_number", "reason", "raw"]


def content_hash(*parts: str | None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part or "").encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:16]


def prompt_id_for(prompt: str, system: str | None = None, constraints: str | None = None) -> str:
    return content_hash(system or "", prompt.strip(), constraints or "")


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
    system = _optional_text(record, "system")
    task = (_optional_text(record, "task") or DEFAULT_TASK).strip() or DEFAULT_TASK
    raw_id = record.get("id")
    if raw_id is not None and (not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool)):
        raise RowRejected(f"field 'id' must be a string or integer, got {_described(raw_id)}")
    if isinstance(raw_id, str):
        _check_unicode(raw_id, "id")
    log_id = str(raw_id) if raw_id is not None else content_hash(source, str(line_number))
    constraints = record.get("constraints")
    if constraints is not None and not isinstance(constraints, dict):
        raise RowRejected(f"field 'constraints' must be a JSON object, got {type(constraints).__name__}")
    try:
        canonical = json.dumps(constraints, sort_keys=True) if constraints else None
    except (TypeError, ValueError, RecursionError) as error:  # e.g. bytes or timestamps in a Parquet struct
        raise RowRejected(f"field 'constraints' is not JSON-serialisable: {error}") from None
    return LogRow(log_id, prompt, system, task, source, line_number, canonical)


def read_jsonl(path: Path, limits: DataSettings) -> Iterator[LogRow | dict[str, Any]]:
    """Yield a LogRow per good line and a quarantine record per bad one."""
    source = str(path)
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is not data
                yield parse_record(json.loads(text), source, line_number, limits)
            except UnicodeDecodeError:
                yield _quarantine(source, line_number, "line is not valid UTF-8", raw)
            except json.JSONDecodeError as error:
                yield _quarantine(source, line_number, f"not valid JSON: {error.msg}", raw)
            except RecursionError:
                yield _quarantine(source, line_number, "JSON nested too deeply", raw)
            except RowRejected as error:
                yield _quarantine(source, line_number, str(error), raw)
            except ValueError as error:  # json.loads beyond JSONDecodeError: an integer of > 4300 digits
                yield _quarantine(source, line_number, f"not valid JSON: {error}", raw)


def _quarantine(source: str, line_number: int, reason: str, raw: bytes) -> dict[str, Any]:
    preview = raw[:_RAW_PREVIEW_CHARS].decode("utf-8", errors="replace").rstrip("\n")
    return {"source_file": source, "line_number": line_number, "reason": reason, "raw": preview}


def prompts_from_rows(rows: pd.DataFrame, limits: DataSettings) -> pd.DataFrame:
    """Usage-log rows -> one prompt per content hash (keeping every log id and source file), split and capped.

    ``rows`` has prompt_id, prompt, system, task, constraints, log_id and source_file.
    """
    if rows.empty:
        return pd.DataFrame(columns=PROMPT_COLUMNS)
    grouped = rows.groupby("prompt_id", sort=True)
    prompts = grouped[["prompt", "system", "task", "constraints"]].first()
    prompts["log_ids"] = grouped["log_id"].agg(list)
    prompts["source_files"] = grouped["source_file"].agg(lambda files: list(dict.fromkeys(files)))
    prompts = prompts.reset_index()
    prompts["split"] = [split_for(pid, limits.heldout_fraction, limits.split_salt) for pid in prompts["prompt_id"]]
    return cap_splits(prompts[PROMPT_COLUMNS], limits).reset_index(drop=True)


def split_for(prompt_id: str, heldout_fraction: float, salt: str) -> str:
    bucket = int(content_hash(salt, prompt_id), 16) % 10_000
    return "heldout" if bucket < heldout_fraction * 10_000 else "train"


@dataclass
class PromptBatch:
    prompts: pd.DataFrame
    quarantine: pd.DataFrame
    log_rows: int
    duplicates: int


def load_prompts(paths: Iterable[Path], limits: DataSettings) -> PromptBatch:
    """Read JSONL usage-log files straight into split prompts plus quarantined rows (no lake needed).

    The pipeline itself goes through ingestion (``tao_pipeline.ingest``); this is the same
    validation and grouping for a notebook or a benchmark. Here ``log_ids`` are the rows' own ids.
    """
    good: list[LogRow] = []
    bad: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"usage-log file {str(path)!r} (setting data.logs) does not exist")
        for item in read_jsonl(path, limits):
            (good if isinstance(item, LogRow) else bad).append(item)
    rows = pd.DataFrame([{
        "prompt_id": prompt_id_for(row.prompt, row.system, row.constraints), "prompt": row.prompt.strip(),
        "system": row.system, "task": row.task, "constraints": row.constraints,
        "log_id": row.log_id, "source_file": row.source_file,
    } for row in good])
    prompts = prompts_from_rows(rows, limits)
    duplicates = len(good) - (rows["prompt_id"].nunique() if len(rows) else 0)
    quarantine = pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)
    return PromptBatch(prompts, quarantine, len(good) + len(bad), duplicates)


def cap_splits(prompts: pd.DataFrame, limits: DataSettings) -> pd.DataFrame:
    """Apply data.max_prompts / data.max_heldout, keeping a deterministic hash-ordered subset."""
    ordered = prompts.sort_values("prompt_id")
    train = ordered[ordered["split"] == "train"]
    heldout = ordered[ordered["split"] == "heldout"]
    if limits.max_prompts is not None:
        train = train.head(limits.max_prompts)
    if limits.max_heldout is not None:
        heldout = heldout.head(limits.max_heldout)
    return pd.concat([train, heldout])


def load_labels(path: Path | None) -> dict[str, list[str]]:
    """Labels file (JSONL: prompt, answer, aliases) -> prompt text -> accepted answers. Evaluation only."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} (setting data.labels) does not exist")
    labels: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answers = [str(record["answer"]), *map(str, record.get("aliases") or [])]
                labels[str(record["prompt"]).strip()] = answers
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"labels file {path}:{line_number} is malformed: {error}") from error
    return labels

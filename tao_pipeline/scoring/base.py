"""The Scorer protocol: label-free scores for the group of candidates of one prompt."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import ConfigDict, Field, validate_call

from tao_pipeline.data.conversation import history_turns
from tao_pipeline.data.prompts import DEFAULT_TASK

# Every scorer's __init__ is wrapped in this: its options are checked against their annotations whenever
# it is built (from settings or directly): the right types (strict: 8.0 is no word count, "60" no
# timeout), every number finite, and in the range its annotation gives. A bad option raises pydantic's
# ValidationError, which names it; the catalog turns that into one line naming the setting.
scorer_options = validate_call(config=ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True))

MAX_TIMEOUT_S = 3600.0  # an hour for one call or one query: anything longer is a typo, not a limit
TimeoutSeconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
TokenCount = Annotated[int, Field(ge=1, le=1_000_000)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class PromptContext:
    prompt: str
    task: str
    system: str | None = None
    # Per-prompt checks declared in the usage log (e.g. {"max_words": 50, "json_schema": {...}}).
    constraints: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, str], ...] = ()  # earlier turns of the conversation, oldest first
    # Users' mean rating (-1..1) of a candidate text: only for a round's training candidates, never evaluation.
    feedback: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """A scorer could not score one response (timeout, exception, unparsable judge output)."""

    reason: str


Score = float | Failed


class Scorer(Protocol):
    """Scores every candidate of one prompt in [0, 1], or Failed for a candidate it could not score.

    Scorers see the whole group because the strongest label-free signals (consensus,
    execution agreement, a judge ranking the group) compare candidates with each other.
    A scorer must not raise for one bad response: it returns Failed for that response.
    """

    name: str

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]: ...


def group_minmax(values: list[float | Failed]) -> list[Score]:
    """Raw values rescaled to [0, 1] within one prompt's candidates (all equal: 0.5); Failed ones stay."""
    scored = [v for v in values if not isinstance(v, Failed)]
    if not scored:
        return list(values)
    low, high = min(scored), max(scored)
    if high == low:
        return [v if isinstance(v, Failed) else 0.5 for v in values]
    return [v if isinstance(v, Failed) else (v - low) / (high - low) for v in values]


def forward_in_batches(scorer_name: str, items: list, batch_size: int, forward, what: str) -> list[Score]:
    """``forward(batch)`` gives one float per item; run batch by batch. A batch that raises is run again item by
    item, so only the culprit fails; a non-finite ``what`` (e.g. "reward") fails too."""

    def finite(value: float) -> Score:
        return value if math.isfinite(value) else Failed(f"{scorer_name}: non-finite {what} {value}")

    def alone(item) -> Score:
        try:
            return finite(forward([item])[0])
        except Exception as error:  # noqa: BLE001 - one response's failure is recorded, not raised
            return Failed(f"{scorer_name}: {type(error).__name__}: {error}"[:300])

    values: list[Score] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        try:
            values.extend(finite(value) for value in forward(batch))
        except Exception:  # noqa: BLE001 - retry one by one so only the culprit fails
            values.extend(alone(item) for item in batch)
    return values


def score_each(scorer_name: str, responses: list[str], score_one) -> list[Score]:
    """Apply a per-response function, turning an exception on one response into Failed."""
    results: list[Score] = []
    for response in responses:
        try:
            results.append(float(score_one(response)))
        except Exception as error:  # noqa: BLE001 - one response's failure is recorded, not raised
            results.append(Failed(f"{scorer_name}: {type(error).__name__}: {error}"[:300]))
    return results


def prompt_context(row) -> PromptContext:
    """A prompts-table row (a dict, a Series or a namedtuple) as the context scorers see: the whole conversation."""
    values = row._asdict() if hasattr(row, "_asdict") else row
    system = values.get("system")
    return PromptContext(
        values["prompt"],
        values.get("task") or DEFAULT_TASK,
        system if isinstance(system, str) and system else None,
        prompt_constraints(values),
        tuple(history_turns(values.get("history"))),
    )


def prompt_constraints(row) -> dict:
    """The per-prompt constraints column (JSON text) as a dict; absent or empty -> {}."""
    raw = row.get("constraints") if hasattr(row, "get") else None
    return json.loads(raw) if isinstance(raw, str) and raw else {}

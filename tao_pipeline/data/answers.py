"""The answers an app already gave to the round's prompts, with what its users did with them.

An answer comes from a usage row that logged its response (a request/response pair, a `tao serve`
row), or from a Batch API output line joined to its input row by external id (``custom_id``).
Feedback comes from the row itself or from feedback events joined by response id; several ratings
of one answer are averaged, and the latest correction counts. The joins and counts run in DuckDB:
only the round's own answers reach memory, however many rows the logs hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from tao_pipeline.data.ingest.writer import EVENTS_TABLE, USAGE_TABLE
from tao_pipeline.data.lake import Lake

ANSWER_COLUMNS = ["prompt_id", "response_id", "response", "model", "rating", "ratings", "comment", "correction"]
_ANSWER_FIELDS = ("response", "response_id", "response_model", "rating", "comment", "correction")
UNKNOWN_PREVIEW = 5
FEEDBACK_RATE_COLUMNS = [
    "model version",
    "answers logged",
    "rated",
    "rated up",
    "rated down",
    "mean rating",
    "corrected",
]


@dataclass
class LoggedAnswers:
    answers: pd.DataFrame  # ANSWER_COLUMNS, one row per distinct answer of a prompt
    unknown_feedback: int = 0  # feedback events whose response id no logged answer has
    unknown_examples: list[str] = field(default_factory=list)


def logged_answers(lake: Lake, prompt_ids: list[str]) -> LoggedAnswers:
    """Every logged answer to ``prompt_ids``, its mean rating and latest correction."""
    logs = lake.scan(USAGE_TABLE)
    if logs is None or not prompt_ids or not _has_answer_columns(lake, logs):
        return LoggedAnswers(pd.DataFrame(columns=ANSWER_COLUMNS))
    events = lake.scan(EVENTS_TABLE)
    given = (
        f"SELECT prompt_id, response, response_id, response_model AS model, rating, correction, comment, "
        f"received_at FROM {logs} WHERE response IS NOT NULL AND list_contains($ids::VARCHAR[], prompt_id)"
    )
    if events:
        given += (
            f" UNION ALL SELECT u.prompt_id, e.response, e.response_id, e.response_model, e.rating, e.correction, "
            f"e.comment, e.received_at FROM {events} e JOIN {logs} u ON e.external_id = u.external_id "
            f"WHERE e.kind = 'response' AND list_contains($ids::VARCHAR[], u.prompt_id)"
        )
        given = (
            f"WITH given AS ({given}) SELECT * FROM given UNION ALL "
            f"SELECT a.prompt_id, NULL, f.response_id, NULL, f.rating, f.correction, f.comment, f.received_at "
            f"FROM {events} f JOIN (SELECT DISTINCT prompt_id, response_id FROM given) a USING (response_id) "
            f"WHERE f.kind = 'feedback'"
        )
    rows = lake.sql(given, params={"ids": sorted(set(prompt_ids))})
    unknown, examples = _unknown_feedback(lake, logs, events)
    return LoggedAnswers(_aggregate(rows), unknown, examples)


def _has_answer_columns(lake: Lake, logs: str) -> bool:
    """Usage rows written before answers were logged have none of their columns."""
    columns = set(lake.sql(f"SELECT * FROM {logs} LIMIT 0").columns)
    return set(_ANSWER_FIELDS) <= columns


def _unknown_feedback(lake: Lake, logs: str, events: str | None) -> tuple[int, list[str]]:
    """Feedback events whose response id no usage row and no batch output holds: how many, and a few ids."""
    if events is None:
        return 0, []
    unknown = lake.sql(
        f"SELECT response_id, count(*) OVER () AS n FROM {events} WHERE kind = 'feedback' "
        f"AND response_id NOT IN (SELECT response_id FROM {logs} WHERE response_id IS NOT NULL "
        f"UNION SELECT response_id FROM {events} WHERE kind = 'response' AND response_id IS NOT NULL) "
        f"ORDER BY response_id LIMIT {UNKNOWN_PREVIEW}"
    )
    if unknown.empty:
        return 0, []
    return int(unknown["n"].iloc[0]), unknown["response_id"].drop_duplicates().tolist()


def _aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=ANSWER_COLUMNS)
    rows = rows.sort_values("received_at", kind="stable")
    # A feedback row names its answer by id only: it takes that answer's text. The same text logged
    # (or rated) twice for one prompt is one answer.
    texts = rows.dropna(subset=["response"]).groupby("response_id")["response"].first()
    rows["response"] = rows["response"].fillna(rows["response_id"].map(texts))
    grouped = rows.dropna(subset=["response"]).groupby(["prompt_id", "response"], sort=True)
    answers = grouped.agg(
        response_id=("response_id", "first"),
        model=("model", "first"),
        rating=("rating", "mean"),
        ratings=("rating", "count"),
        comment=("comment", "last"),
        correction=("correction", "last"),
    )
    return answers.reset_index()[ANSWER_COLUMNS]


def feedback_rates(lake: Lake) -> pd.DataFrame:
    """Per model version that answered in the logs: how many answers users rated, up and down, and corrected."""
    logs = lake.scan(USAGE_TABLE)
    if logs is None or not _has_answer_columns(lake, logs):
        return pd.DataFrame(columns=FEEDBACK_RATE_COLUMNS)
    events = lake.scan(EVENTS_TABLE)
    answers = (
        f"SELECT response_id, coalesce(response_model, '(unknown)') AS model, rating, correction "
        f"FROM {logs} WHERE response IS NOT NULL"
    )
    if events:
        answers = (
            f"WITH answers AS ({answers}) SELECT * FROM answers UNION ALL "
            f"SELECT f.response_id, v.model, f.rating, f.correction FROM {events} f JOIN "
            f"(SELECT response_id, any_value(model) AS model FROM answers WHERE response_id IS NOT NULL "
            f"GROUP BY response_id) v USING (response_id) WHERE f.kind = 'feedback'"
        )
    return lake.sql(
        f'SELECT model AS "model version", '
        f'count(DISTINCT response_id) + count(*) FILTER (WHERE response_id IS NULL) AS "answers logged", '
        f'count(rating) AS "rated", count(*) FILTER (WHERE rating > 0) AS "rated up", '
        f'count(*) FILTER (WHERE rating < 0) AS "rated down", round(avg(rating), 3) AS "mean rating", '
        f'count(correction) AS "corrected" FROM ({answers}) GROUP BY model ORDER BY model'
    )

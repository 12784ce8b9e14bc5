"""The answers an app already gave to the round's prompts, with what its users did with them.

An answer comes from a usage row that logged its response (a request/response pair, a `tao serve`
row), or from a Batch API output line joined to its input row by external id (``custom_id``).
Feedback comes from the row itself or from feedback events joined by response id; several ratings
of one answer are averaged, and the latest correction counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from tao_pipeline.data.ingest.writer import EVENTS_TABLE, USAGE_TABLE
from tao_pipeline.data.lake import Lake

ANSWER_COLUMNS = ["prompt_id", "response_id", "response", "model", "rating", "ratings", "comment", "correction"]
_ANSWER_FIELDS = ("response", "response_id", "response_model", "rating", "comment", "correction")
UNKNOWN_PREVIEW = 5


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
    ids = {"ids": sorted(set(prompt_ids))}
    given = [
        f"SELECT prompt_id, response, response_id, response_model AS model, rating, correction, comment, "
        f"received_at FROM {logs} WHERE response IS NOT NULL AND list_contains($ids::VARCHAR[], prompt_id)"
    ]
    if events:
        given.append(
            f"SELECT u.prompt_id, e.response, e.response_id, e.response_model AS model, e.rating, e.correction, "
            f"e.comment, e.received_at FROM {events} e JOIN {logs} u ON e.external_id = u.external_id "
            f"WHERE e.kind = 'response' AND list_contains($ids::VARCHAR[], u.prompt_id)"
        )
    rows = lake.sql(" UNION ALL ".join(given), params=ids)
    feedback = _feedback_events(lake, events)
    return _aggregate(rows, feedback, _known_response_ids(lake, logs, events))


def _has_answer_columns(lake: Lake, logs: str) -> bool:
    """Usage rows written before answers were logged have none of their columns."""
    columns = set(lake.sql(f"SELECT * FROM {logs} LIMIT 0").columns)
    return set(_ANSWER_FIELDS) <= columns


def _feedback_events(lake: Lake, events: str | None) -> pd.DataFrame:
    if events is None:
        return pd.DataFrame(columns=["response_id", "rating", "correction", "comment", "received_at"])
    return lake.sql(
        f"SELECT response_id, rating, correction, comment, received_at FROM {events} "
        "WHERE kind = 'feedback' AND response_id IS NOT NULL"
    )


def _known_response_ids(lake: Lake, logs: str, events: str | None) -> set[str]:
    known = lake.sql(f"SELECT DISTINCT response_id FROM {logs} WHERE response_id IS NOT NULL")["response_id"]
    found = set(known)
    if events:
        answered = lake.sql(f"SELECT DISTINCT response_id FROM {events} WHERE kind = 'response'")["response_id"]
        found |= set(answered.dropna())
    return found


def _aggregate(rows: pd.DataFrame, feedback: pd.DataFrame, known: set[str]) -> LoggedAnswers:
    unknown = feedback[~feedback["response_id"].isin(known)]
    matched = rows[["prompt_id", "response_id"]].dropna().merge(feedback, on="response_id")
    everything = pd.concat([rows, matched], ignore_index=True) if len(matched) else rows
    if everything.empty:
        answers = pd.DataFrame(columns=ANSWER_COLUMNS)
    else:
        everything = everything.sort_values("received_at", kind="stable")
        # An answer is its text for its prompt: the same text logged twice (or rated twice) is one answer.
        texts = everything.groupby("response_id")["response"].first()
        everything["response"] = everything["response"].fillna(everything["response_id"].map(texts))
        grouped = everything.dropna(subset=["response"]).groupby(["prompt_id", "response"], sort=True)
        answers = grouped.agg(
            response_id=("response_id", "first"),
            model=("model", "first"),
            rating=("rating", "mean"),
            ratings=("rating", "count"),
            comment=("comment", "last"),
            correction=("correction", "last"),
        ).reset_index()[ANSWER_COLUMNS]
    examples = unknown["response_id"].drop_duplicates().head(UNKNOWN_PREVIEW).tolist()
    return LoggedAnswers(answers, len(unknown), examples)


FEEDBACK_RATE_COLUMNS = [
    "model version",
    "answers logged",
    "rated",
    "rated up",
    "rated down",
    "mean rating",
    "corrected",
]


def feedback_rates(lake: Lake) -> pd.DataFrame:
    """Per model version that answered in the logs: how many answers users rated, up and down, and corrected."""
    logs = lake.scan(USAGE_TABLE)
    if logs is None or not _has_answer_columns(lake, logs):
        return pd.DataFrame(columns=FEEDBACK_RATE_COLUMNS)
    answers = lake.sql(
        f"SELECT response_id, response_model AS model, rating, correction FROM {logs} WHERE response IS NOT NULL"
    )
    events = lake.scan(EVENTS_TABLE)
    if events is not None:
        later = lake.sql(
            f"SELECT response_id, rating, correction FROM {events} WHERE kind = 'feedback' AND response_id IS NOT NULL"
        )
        versions = answers.dropna(subset=["response_id"]).drop_duplicates("response_id")[["response_id", "model"]]
        answers = pd.concat([answers, later.merge(versions, on="response_id")], ignore_index=True)
    answers["model"] = answers["model"].fillna("(unknown)")
    rows = []
    for model, group in answers.groupby("model", sort=True):
        logged = group["response_id"].nunique() + int(group["response_id"].isna().sum())
        rated = group.dropna(subset=["rating"])
        rows.append(
            [
                model,
                logged,
                len(rated),
                int((rated["rating"] > 0).sum()),
                int((rated["rating"] < 0).sum()),
                round(float(rated["rating"].mean()), 3) if len(rated) else None,
                int(group["correction"].notna().sum()),
            ]
        )
    return pd.DataFrame(rows, columns=FEEDBACK_RATE_COLUMNS)

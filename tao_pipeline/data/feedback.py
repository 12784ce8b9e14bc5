"""What a user did with an answer: a rating, a comment, a corrected answer.

A rating is a number from -1 (bad) to 1 (good). Thumbs are the common case: ``"up"`` is 1 and
``"down"`` is -1 (also ``"thumbs_up"``, ``"positive"``, ``true``, ...); a score already on a scale
of its own is mapped by the team before it is logged (or by ``data.mapping``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_COMMENT_CHARS = 4_000
MAX_CORRECTION_CHARS = 32_000
_UP = frozenset({"up", "thumbs_up", "thumbsup", "+1", "positive", "like", "good", "helpful"})
_DOWN = frozenset({"down", "thumbs_down", "thumbsdown", "-1", "negative", "dislike", "bad", "unhelpful"})


class FeedbackRejected(ValueError):
    """Why a feedback cannot be taken (one line, naming the field)."""


@dataclass(frozen=True)
class Feedback:
    rating: float | None  # -1 .. 1
    comment: str | None = None
    correction: str | None = None  # the answer the user says it should have been


def parse_rating(value: Any) -> float | None:
    """A rating as a number in [-1, 1]: thumbs words, booleans or a number; None when there is none."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, str):
        words = {value.strip().lower(), value.strip().lower().replace(" ", "_").replace("-", "_")}
        if words & _UP:
            return 1.0
        if words & _DOWN:
            return -1.0
        try:
            value = float(value)
        except ValueError:
            raise FeedbackRejected(f"rating {value[:40]!r} is not 'up', 'down' or a number from -1 to 1") from None
    if not isinstance(value, (int, float)) or not -1 <= value <= 1 or not math.isfinite(value):
        shown = repr(value)[:40]
        raise FeedbackRejected(f"rating {shown} is not 'up', 'down' or a number from -1 to 1")
    return float(value)


def parse_feedback(value: Any) -> Feedback:
    """A feedback object (``rating``, ``comment``, ``correction``) checked field by field."""
    if not isinstance(value, dict):
        raise FeedbackRejected(f"feedback must be a JSON object, got {type(value).__name__}")
    rating = parse_rating(value.get("rating", value.get("score")))
    comment = _text(value, "comment", MAX_COMMENT_CHARS)
    correction = _text(value, "correction", MAX_CORRECTION_CHARS)
    if rating is None and comment is None and correction is None:
        raise FeedbackRejected("feedback has no rating, comment or correction")
    return Feedback(rating, comment, correction)


def _text(value: dict[str, Any], field: str, limit: int) -> str | None:
    text = value.get(field)
    if text is None:
        return None
    if not isinstance(text, str):
        raise FeedbackRejected(f"feedback {field} must be a string, got {type(text).__name__}")
    if len(text) > limit:
        raise FeedbackRejected(f"feedback {field} too long: {len(text)} chars > {limit}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise FeedbackRejected(f"feedback {field} is not valid Unicode: {error.reason}") from None
    return text.strip() or None

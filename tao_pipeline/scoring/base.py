"""The Scorer protocol: label-free scores for the group of candidates of one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PromptContext:
    prompt: str
    task: str
    system: str | None = None


class Scorer(Protocol):
    """Scores every candidate of one prompt in [0, 1]; None marks a candidate it failed to score.

    Scorers see the whole group because the strongest label-free signals (consensus,
    ranking by a judge) compare candidates with each other.
    """

    name: str

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float | None]: ...

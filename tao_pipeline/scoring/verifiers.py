"""Format verifiers: programmatic checks that need no labels and no model."""

from __future__ import annotations

from tao_pipeline.scoring.base import PromptContext
from tao_pipeline.scoring.extractors import first_line_number, last_number, words


class ConciseFormatVerifier:
    """Rewards a one-line reply of at most ``max_words`` words; longer ones score in proportion."""

    name = "concise_format"

    def __init__(self, max_words: int = 8):
        self.max_words = max_words

    def score_one(self, response: str) -> float:
        count = len(words(response))
        if count == 0:
            return 0.0
        one_line = len([line for line in response.splitlines() if line.strip()]) == 1
        return min(1.0, self.max_words / count) * (1.0 if one_line else 0.5)

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        return [self.score_one(r) for r in responses]


class NumberFormatVerifier:
    """1 when the first line states a number concisely, 0.5 when a number appears later, else 0."""

    name = "number_format"

    def __init__(self, max_words: int = 8):
        self.concise = ConciseFormatVerifier(max_words)

    def score_one(self, response: str) -> float:
        if first_line_number(response) is not None:
            return 0.5 + 0.5 * self.concise.score_one(response)
        return 0.5 if last_number(response) is not None else 0.0

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        return [self.score_one(r) for r in responses]

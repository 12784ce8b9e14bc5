"""Self-consistency: a candidate scores the share of candidates that reached the same answer."""

from __future__ import annotations

from collections import Counter

from tao_pipeline.scoring.base import PromptContext
from tao_pipeline.scoring.extractors import Extractor


class SelfConsistencyScorer:
    name = "self_consistency"

    def __init__(self, extractor_for_task: dict[str, Extractor], min_agreement: float = 0.0):
        self.extractor_for_task = extractor_for_task
        self.min_agreement = min_agreement

    def extractor(self, task: str) -> Extractor:
        return self.extractor_for_task.get(task, self.extractor_for_task["default"])

    def answers(self, context: PromptContext, responses: list[str]) -> list[str | None]:
        extract = self.extractor(context.task)
        return [extract(response, context.prompt) for response in responses]

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        answers = self.answers(context, responses)
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            return [0.0] * len(responses)
        top_share = votes.most_common(1)[0][1] / len(responses)
        if top_share < self.min_agreement:
            return [0.0] * len(responses)  # too little agreement: no signal, so no pair
        return [votes[a] / len(responses) if a is not None else 0.0 for a in answers]

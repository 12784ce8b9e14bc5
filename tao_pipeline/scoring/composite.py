"""Composite scorer: routes by the prompt's task and takes a weighted sum of several scorers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tao_pipeline.scoring.base import PromptContext, Scorer


@dataclass
class GroupScores:
    scores: list[float]
    parts: list[dict[str, float | None]]
    failures: list[dict[str, str]] = field(default_factory=list)

    def parts_json(self, index: int) -> str:
        return json.dumps(self.parts[index], sort_keys=True)


class CompositeScorer:
    name = "composite"

    def __init__(self, scorers: dict[str, Scorer], weights_by_task: dict[str, dict[str, float]]):
        self.scorers = scorers
        self.weights_by_task = weights_by_task

    def weights(self, task: str) -> dict[str, float]:
        return self.weights_by_task.get(task, self.weights_by_task["default"])

    def score(self, context: PromptContext, responses: list[str]) -> GroupScores:
        """Weighted mean of the task's scorers; a scorer that raises counts 0 and is recorded."""
        weights = self.weights(context.task)
        parts: list[dict[str, float | None]] = [{} for _ in responses]
        failures: list[dict[str, str]] = [{} for _ in responses]
        for name, weight in weights.items():
            try:
                values = self.scorers[name].score_group(context, responses)
            except Exception as error:  # one scorer's failure must not kill the round
                values = [None] * len(responses)
                for failure in failures:
                    failure[name] = f"{type(error).__name__}: {error}"[:300]
            for part, value in zip(parts, values):
                part[name] = value
        total = sum(weights.values()) or 1.0
        scores = [sum(weights[n] * (p[n] or 0.0) for n in weights) / total for p in parts]
        return GroupScores(scores, parts, failures)

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        return self.score(context, responses).scores

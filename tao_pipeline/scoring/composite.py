"""Composite scorer: routes by the prompt's task; gates, then a weighted mean of the other scorers.

A scorer that fails on a response (or returns no finite score) leaves that part unknown, never 0,
and a response with an unknown part that counts (a gate, or a positive weight) has an unknown
score: NaN. Unknown is never a preference signal: pairs, best-of-k and win rates skip it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

from tao_pipeline.scoring.base import Failed, PromptContext, Score, Scorer


@dataclass
class GroupScores:
    scores: list[float]
    parts: list[dict[str, float | None]]
    failures: list[dict[str, str]] = field(default_factory=list)

    def parts_json(self, index: int) -> str:
        return json.dumps(self.parts[index], sort_keys=True)


@dataclass(frozen=True)
class TaskRecipe:
    weights: dict[str, float]
    gates: tuple[str, ...] = ()


class CompositeScorer:
    """Per task: every gate scorer must reach ``gate_threshold``, then the weighted mean of the others ranks.

    A response that fails a gate scores 0. A scorer that fails on a response leaves its part
    unknown (None) with the reason recorded, and the response's score unknown (NaN); a scorer that
    raises outright fails every response of the group.
    ``length_penalty`` > 0 divides a score by 1 + penalty x (how much longer than the group's
    median the response is), a guard against judges and consensus that favour long answers.
    """

    name = "composite"

    def __init__(
        self,
        scorers: dict[str, Scorer],
        recipes: dict[str, TaskRecipe],
        gate_threshold: float = 1.0,
        length_penalty: float = 0.0,
    ):
        self.scorers = scorers
        self.recipes = recipes
        self.gate_threshold = gate_threshold
        self.length_penalty = length_penalty

    def recipe(self, task: str) -> TaskRecipe:
        return self.recipes.get(task, self.recipes["default"])

    def score(self, context: PromptContext, responses: list[str]) -> GroupScores:
        recipe = self.recipe(context.task)
        names = list(dict.fromkeys([*recipe.gates, *recipe.weights]))
        parts: list[dict[str, float | None]] = [{} for _ in responses]
        failures: list[dict[str, str]] = [{} for _ in responses]
        for name in names:
            for i, value in enumerate(self._run(name, context, responses)):
                problem = _problem(value)
                if problem:
                    parts[i][name], failures[i][name] = None, problem
                else:
                    parts[i][name] = float(value)
        scores = [self._combine(recipe, part) for part in parts]
        if self.length_penalty > 0:
            scores = self._penalise_length(scores, responses)
        return GroupScores(scores, parts, failures)

    def _run(self, name: str, context: PromptContext, responses: list[str]) -> list[Score]:
        try:
            values = self.scorers[name].score_group(context, responses)
        except Exception as error:  # noqa: BLE001 - one scorer's failure must not kill the round
            return [Failed(f"{type(error).__name__}: {error}"[:300])] * len(responses)
        if len(values) != len(responses):
            return [Failed(f"returned {len(values)} scores for {len(responses)} responses")] * len(responses)
        return values

    def _combine(self, recipe: TaskRecipe, part: dict[str, float | None]) -> float:
        counted = [*recipe.gates, *(name for name, weight in recipe.weights.items() if weight > 0)]
        if any(part.get(name) is None for name in counted):
            return math.nan  # unknown: a part that counts failed
        if any(part[gate] < self.gate_threshold for gate in recipe.gates):
            return 0.0
        total = sum(recipe.weights.values())
        if not total:
            return 1.0 if recipe.gates else 0.0  # gates alone: passing them is the score
        return sum(weight * part[name] for name, weight in recipe.weights.items() if weight > 0) / total

    def _penalise_length(self, scores: list[float], responses: list[str]) -> list[float]:
        median = statistics.median(len(r) for r in responses) or 1
        return [s / (1.0 + self.length_penalty * max(0.0, len(r) / median - 1.0)) for s, r in zip(scores, responses)]

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        return self.score(context, responses).scores


def _problem(value: Score | None) -> str | None:
    """Why a scorer's value is no score, or None when it is one."""
    if isinstance(value, Failed):
        return value.reason
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"returned {value!r}, not a score"
    if not math.isfinite(value):
        return f"returned a non-finite score ({value})"
    return None

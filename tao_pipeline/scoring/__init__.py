"""Label-free scoring: the Scorer protocol, its implementations and the composite that routes by task."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.scoring.base import PromptContext, Scorer
from tao_pipeline.scoring.composite import CompositeScorer, TaskRecipe
from tao_pipeline.scoring.extractors import get_extractor
from tao_pipeline.scoring.registry import build_named_scorer
from tao_pipeline.scoring.self_consistency import SelfConsistencyScorer
from tao_pipeline.settings import ScoringSettings

def prompt_constraints(row) -> dict:
    """The per-prompt constraints column (JSON text) as a dict; absent or empty -> {}."""
    raw = row.get("constraints") if hasattr(row, "get") else None
    return json.loads(raw) if isinstance(raw, str) and raw else {}


SCORE_COLUMNS = ["response_id", "prompt_id", "task", "answer", "score", "score_parts", "failures"]

__all__ = ["CompositeScorer", "PromptContext", "Scorer", "SCORE_COLUMNS", "build_scorer", "score_responses"]


class TaoScorer(CompositeScorer):
    """The configured composite, plus the task's answer extractor for lineage and evaluation.

    Only the scorers some task uses are built, so an unused reward model is never loaded.
    """

    def __init__(self, settings: ScoringSettings, cache_dir: Path | None = None):
        extractors = {task: get_extractor(name) for task, name in settings.extractors.items()}
        self.consistency = SelfConsistencyScorer(extractors, settings.min_agreement)
        recipes = {task: TaskRecipe(weights, tuple(settings.gates.get(task, ())))
                   for task, weights in settings.scorers.items()}
        used = {name for recipe in recipes.values() for name in (*recipe.weights, *recipe.gates)}
        scorers: dict[str, Scorer] = {"self_consistency": self.consistency}
        for name in sorted(used - {"self_consistency"}):
            scorers[name] = build_named_scorer(name, settings, cache_dir)
        super().__init__(scorers, recipes, settings.gate_threshold, settings.length_penalty)

    def answers(self, context: PromptContext, responses: list[str]) -> list[str | None]:
        return self.consistency.answers(context, responses)


def build_scorer(settings: ScoringSettings, cache_dir: Path | None = None) -> TaoScorer:
    """The composite scorer the settings describe; cache_dir holds caches such as the judge's."""
    return TaoScorer(settings, cache_dir)


def score_responses(
    candidates: pd.DataFrame, prompts: pd.DataFrame, scorer: TaoScorer, progress: bool = True
) -> pd.DataFrame:
    """One score row per candidate, with the per-scorer parts kept so lineage shows why it won."""
    columns = [c for c in ["prompt_id", "prompt", "system", "task", "constraints"] if c in prompts.columns]
    merged = candidates.merge(prompts[columns], on="prompt_id", how="left")
    rows: list[dict] = []
    groups = merged.groupby("prompt_id", sort=True)
    for prompt_id, group in tqdm(groups, total=groups.ngroups, desc="score", unit="prompt", disable=not progress):
        first = group.iloc[0]
        context = PromptContext(first["prompt"], first["task"], first["system"], prompt_constraints(first))
        responses = group["response"].tolist()
        result = scorer.score(context, responses)
        answers = scorer.answers(context, responses)
        for i, response_id in enumerate(group["response_id"]):
            rows.append({
                "response_id": response_id, "prompt_id": prompt_id, "task": context.task, "answer": answers[i],
                "score": result.scores[i], "score_parts": result.parts_json(i),
                "failures": json.dumps(result.failures[i]) if result.failures[i] else None,
            })
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)

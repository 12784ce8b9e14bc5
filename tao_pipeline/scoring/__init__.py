"""Label-free scoring: the Scorer protocol, its implementations and the composite that routes by task."""

from __future__ import annotations

import json

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.scoring.base import PromptContext, Scorer
from tao_pipeline.scoring.composite import CompositeScorer
from tao_pipeline.scoring.extractors import get_extractor
from tao_pipeline.scoring.self_consistency import SelfConsistencyScorer
from tao_pipeline.scoring.verifiers import ConciseFormatVerifier, NumberFormatVerifier
from tao_pipeline.settings import ScoringSettings

SCORE_COLUMNS = ["response_id", "prompt_id", "task", "answer", "score", "score_parts", "failures"]

__all__ = ["CompositeScorer", "PromptContext", "Scorer", "SCORE_COLUMNS", "build_scorer", "score_responses"]


class TaoScorer(CompositeScorer):
    """The configured composite, plus the task's answer extractor for lineage and evaluation."""

    def __init__(self, settings: ScoringSettings):
        extractors = {task: get_extractor(name) for task, name in settings.extractors.items()}
        self.consistency = SelfConsistencyScorer(extractors, settings.min_agreement)
        scorers: dict[str, Scorer] = {
            "self_consistency": self.consistency,
            "concise_format": ConciseFormatVerifier(settings.concise_max_words),
            "number_format": NumberFormatVerifier(settings.concise_max_words),
        }
        super().__init__(scorers, settings.scorers)

    def answers(self, context: PromptContext, responses: list[str]) -> list[str | None]:
        return self.consistency.answers(context, responses)


def build_scorer(settings: ScoringSettings) -> TaoScorer:
    return TaoScorer(settings)


def score_responses(
    candidates: pd.DataFrame, prompts: pd.DataFrame, scorer: TaoScorer, progress: bool = True
) -> pd.DataFrame:
    """One score row per candidate, with the per-scorer parts kept so lineage shows why it won."""
    merged = candidates.merge(prompts[["prompt_id", "prompt", "system", "task"]], on="prompt_id", how="left")
    rows: list[dict] = []
    groups = merged.groupby("prompt_id", sort=True)
    for prompt_id, group in tqdm(groups, total=groups.ngroups, desc="score", unit="prompt", disable=not progress):
        first = group.iloc[0]
        context = PromptContext(first["prompt"], first["task"], first["system"])
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

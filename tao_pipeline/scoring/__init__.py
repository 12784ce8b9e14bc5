"""Label-free scoring: the Scorer protocol, its implementations and the composite that routes by task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.scoring.base import PromptContext, Scorer, prompt_constraints, prompt_context
from tao_pipeline.scoring.cache import SCORE_COLUMNS, ScoreCache
from tao_pipeline.scoring.catalog import ScorerOptionsError, build_named_scorer
from tao_pipeline.scoring.composite import CompositeScorer, TaskRecipe
from tao_pipeline.scoring.extractors import answer_matches, get_extractor
from tao_pipeline.scoring.self_consistency import SelfConsistencyScorer
from tao_pipeline.settings import ScoringSettings

SCORE_SHARD_PROMPTS = 64  # prompts scored between two cache writes

__all__ = [
    "CompositeScorer",
    "PromptContext",
    "ScoreCache",
    "Scorer",
    "SCORE_COLUMNS",
    "ScorerOptionsError",
    "ScoringOutage",
    "TaoScorer",
    "build_scorer",
    "check_scorers",
    "check_unscored_share",
    "group_key",
    "prompt_constraints",
    "prompt_context",
    "score_candidates",
    "score_responses",
]


class TaoScorer(CompositeScorer):
    """The configured composite, plus the task's answer extractor for lineage and evaluation.

    Only the scorers some task uses are built, so an unused reward model is never loaded.
    """

    def __init__(self, settings: ScoringSettings, cache_dir: Path | None = None):
        extractors = {task: get_extractor(name) for task, name in settings.extractors.items()}
        self.consistency = SelfConsistencyScorer(extractors, settings.min_agreement)
        recipes = {
            task: TaskRecipe(weights, tuple(settings.gates.get(task, ()))) for task, weights in settings.scorers.items()
        }
        used = {name for recipe in recipes.values() for name in (*recipe.weights, *recipe.gates)}
        scorers: dict[str, Scorer] = {"self_consistency": self.consistency}
        for name in sorted(used - {"self_consistency"}):
            scorers[name] = build_named_scorer(name, settings, cache_dir)
        super().__init__(scorers, recipes, settings.gate_threshold, settings.length_penalty)

    def answers(self, context: PromptContext, responses: list[str]) -> list[str | None]:
        return self.consistency.answers(context, responses)

    def matches_label(self, context: PromptContext, answer: str | None, accepted: list[str]) -> bool:
        """Does an extracted answer agree with an accepted label, extracted and normalised the same way?"""
        return answer_matches(answer, accepted, self.consistency.extractor(context.task), context.prompt)


def check_scorers(settings: ScoringSettings, cache_dir: Path | None = None) -> None:
    """Build every scorer the settings use, so a bad option fails now, named (ScorerOptionsError), and
    not when a round reaches scoring. Loads no model."""
    build_scorer(settings, cache_dir)


def build_scorer(settings: ScoringSettings, cache_dir: Path | None = None) -> TaoScorer:
    """The composite scorer the settings describe; cache_dir holds caches such as the judge's."""
    return TaoScorer(settings, cache_dir)


def score_responses(
    candidates: pd.DataFrame,
    prompts: pd.DataFrame,
    scorer: TaoScorer,
    progress: bool = True,
    cache: ScoreCache | None = None,
) -> pd.DataFrame:
    """One score row per candidate, with the per-scorer parts kept so lineage shows why it won.

    With a cache, prompts whose exact candidate group was scored before under the same scoring
    settings are not scored again, and newly scored prompts are saved shard by shard, so a
    killed run resumes where it stopped.
    """
    columns = [c for c in ["prompt_id", "prompt", "system", "history", "task", "constraints"] if c in prompts.columns]
    merged = candidates.merge(prompts[columns], on="prompt_id", how="left")
    groups = dict(iter(merged.groupby("prompt_id", sort=True)))
    keys = {prompt_id: group_key(group) for prompt_id, group in groups.items()}
    cached = cache.load(set(keys.values())) if cache else pd.DataFrame(columns=[*SCORE_COLUMNS, "group_key"])
    todo = [prompt_id for prompt_id, key in keys.items() if key not in set(cached["group_key"])]
    tables = [cached]
    bar = tqdm(total=len(todo), desc="score", unit="prompt", disable=not progress or not todo)
    for start in range(0, len(todo), SCORE_SHARD_PROMPTS):
        rows = []
        for prompt_id in todo[start : start + SCORE_SHARD_PROMPTS]:
            rows.extend(_score_group(groups[prompt_id], scorer, keys[prompt_id]))
            bar.update(1)
        shard = pd.DataFrame(rows, columns=[*SCORE_COLUMNS, "group_key"])
        if cache:  # a group with a failure is scored again next time (the judge may be back)
            cache.save(shard[~shard["group_key"].isin(shard.loc[shard["failures"].notna(), "group_key"])])
        tables.append(shard)
    bar.close()
    table = (
        pd.concat([t for t in tables if len(t)], ignore_index=True)
        if any(len(t) for t in tables)
        else pd.DataFrame(columns=[*SCORE_COLUMNS, "group_key"])
    )
    order = candidates[["response_id"]].reset_index(drop=True)
    return order.merge(table, on="response_id", how="left")[SCORE_COLUMNS]


def score_candidates(
    candidates: pd.DataFrame, prompts: pd.DataFrame, settings: ScoringSettings, cache_dir: Path
) -> tuple[pd.DataFrame, ScoreCache]:
    """A round's scores with the configured scorer, through the score cache (which says what it reused).

    Raises ScoringOutage when more than ``scoring.max_unscored_share`` of the responses have no score:
    a round does not train on a scorer outage.
    """
    cache = ScoreCache(cache_dir, settings)
    scores = score_responses(candidates, prompts, build_scorer(settings, cache_dir), cache=cache)
    check_unscored_share(scores, settings.max_unscored_share)
    return scores, cache


class ScoringOutage(RuntimeError):
    """Most responses could not be scored (a judge or reward model down, a database missing)."""


def check_unscored_share(scores: pd.DataFrame, max_share: float) -> None:
    unscored = scores["score"].isna()
    if not len(scores) or unscored.mean() <= max_share:
        return
    reasons = scores.loc[unscored, "failures"].dropna().map(lambda text: "; ".join(json.loads(text).values()))
    common = reasons.value_counts().index[0] if len(reasons) else "no reason recorded"
    raise ScoringOutage(
        f"{int(unscored.sum())} of {len(scores)} responses have no score (most common: {common[:200]}), more than "
        f"scoring.max_unscored_share={max_share}: not training on a scorer outage. Fix the scorer and "
        "materialize the round again; the scores that succeeded are cached."
    )


def _feedback(group: pd.DataFrame) -> dict[str, float]:
    """The candidates' users' ratings by text (the ``rating`` column of candidates built from logged answers)."""
    if "rating" not in group.columns:
        return {}
    rated = group.dropna(subset=["rating"])
    return {str(text): float(rating) for text, rating in zip(rated["response"], rated["rating"])}


def group_key(group: pd.DataFrame) -> str:
    """What a prompt's scores depend on: the prompt with its task and constraints, and its exact candidates."""
    first = group.iloc[0]
    context = [str(first.get(c)) for c in ("prompt", "system", "task", "constraints")]
    if isinstance(first.get("history"), str):  # a conversation; single-turn keys stay as they were
        context.append(first["history"])
    if "rating" in group.columns and group["rating"].notna().any():  # users' ratings change the scores
        context.append(json.dumps(_feedback(group), sort_keys=True))
    return content_hash(*context, *sorted(group["response_id"]))


def _score_group(group: pd.DataFrame, scorer: TaoScorer, key: str) -> list[dict]:
    first = group.iloc[0]
    context = dataclasses.replace(prompt_context(first), feedback=_feedback(group))
    responses = group["response"].tolist()
    result = scorer.score(context, responses)
    answers = scorer.answers(context, responses)
    return [
        {
            "response_id": response_id,
            "prompt_id": first["prompt_id"],
            "task": context.task,
            "answer": answers[i],
            "score": result.scores[i],
            "score_parts": result.parts_json(i),
            "failures": json.dumps(result.failures[i]) if result.failures[i] else None,
            "group_key": key,
        }
        for i, response_id in enumerate(group["response_id"])
    ]

"""Scorer and extractor names as they appear in settings, and how each scorer is built.

A factory takes the scorer's options (``[scoring.options.<name>]`` in tao.toml) plus the
scoring settings; heavy imports (models, databases) happen only for scorers a task uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_pipeline.scoring.extractors import get_extractor

if TYPE_CHECKING:
    from tao_pipeline.scoring.base import Scorer
    from tao_pipeline.settings import ScoringSettings

# name -> "module:Class"; every class takes its options as keyword arguments.
SCORER_CLASSES = {
    "concise_format": "tao_pipeline.scoring.verifiers:ConciseFormatVerifier",
    "number_format": "tao_pipeline.scoring.verifiers:NumberFormatVerifier",
    "json_valid": "tao_pipeline.scoring.verifiers:JsonVerifier",
    "regex_format": "tao_pipeline.scoring.verifiers:RegexVerifier",
    "length_limit": "tao_pipeline.scoring.verifiers:LengthVerifier",
    "instruction_following": "tao_pipeline.scoring.instructions:InstructionVerifier",
    "arithmetic_consistency": "tao_pipeline.scoring.verifiers:ArithmeticConsistencyVerifier",
    "sql_execution": "tao_pipeline.scoring.sql:SqlExecutionVerifier",
    "embedding_consensus": "tao_pipeline.scoring.embedding:EmbeddingConsensusScorer",
    "reward_model": "tao_pipeline.scoring.reward_model:RewardModelScorer",
    "llm_judge": "tao_pipeline.scoring.judge:LLMJudgeScorer",
}
SCORER_NAMES = ("self_consistency", *SCORER_CLASSES)


def check_scoring_names(
    scorers: dict[str, dict[str, float]], extractors: dict[str, str],
    gates: dict[str, list[str]] | None = None, options: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Raise ValueError naming the first unknown scorer or extractor, or a missing default."""
    for table, name in ((scorers, "scoring.scorers"), (extractors, "scoring.extractors")):
        if "default" not in table:
            raise ValueError(f"{name} needs a 'default' entry")
    for task, weights in scorers.items():
        for scorer, weight in weights.items():
            _check_name(scorer, f"scoring.scorers.{task}")
            if weight < 0:
                raise ValueError(f"scoring.scorers.{task}.{scorer}: weight must be >= 0, got {weight}")
    for task, names in (gates or {}).items():
        for scorer in names:
            _check_name(scorer, f"scoring.gates.{task}")
    for scorer in options or {}:
        _check_name(scorer, "scoring.options")
    for task, extractor in extractors.items():
        try:
            get_extractor(extractor)
        except ValueError as error:
            raise ValueError(f"scoring.extractors.{task}: {error}") from None


def _check_name(scorer: str, where: str) -> None:
    if scorer not in SCORER_NAMES:
        raise ValueError(f"{where}: unknown scorer {scorer!r}; known: {list(SCORER_NAMES)}")


def build_named_scorer(name: str, settings: ScoringSettings, cache_dir: Path | None) -> Scorer:
    """Instantiate one scorer (not self_consistency, which the composite owns) from its options."""
    options = dict(settings.options.get(name, {}))
    defaults = {"concise_format": {"max_words": settings.concise_max_words},
                "number_format": {"max_words": settings.concise_max_words},
                "llm_judge": {"cache_dir": str(cache_dir / "judge") if cache_dir else None}}
    options = {**defaults.get(name, {}), **options}
    module_name, class_name = SCORER_CLASSES[name].split(":")
    scorer_class = getattr(importlib.import_module(module_name), class_name)
    try:
        return scorer_class(**options)
    except TypeError as error:
        raise ValueError(f"scoring.options.{name}: {error}") from None

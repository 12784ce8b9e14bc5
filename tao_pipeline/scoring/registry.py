"""Scorer and extractor names as they appear in settings."""

from __future__ import annotations

from tao_pipeline.scoring.extractors import EXTRACTORS

SCORER_NAMES = ("self_consistency", "concise_format", "number_format")


def check_scoring_names(scorers: dict[str, dict[str, float]], extractors: dict[str, str]) -> None:
    """Raise ValueError naming the first unknown scorer or extractor, or a missing default."""
    for table, name in ((scorers, "scoring.scorers"), (extractors, "scoring.extractors")):
        if "default" not in table:
            raise ValueError(f"{name} needs a 'default' entry")
    for task, weights in scorers.items():
        for scorer, weight in weights.items():
            if scorer not in SCORER_NAMES:
                raise ValueError(f"scoring.scorers.{task}: unknown scorer {scorer!r}; known: {list(SCORER_NAMES)}")
            if weight < 0:
                raise ValueError(f"scoring.scorers.{task}.{scorer}: weight must be >= 0, got {weight}")
    for task, extractor in extractors.items():
        if extractor not in EXTRACTORS:
            raise ValueError(f"scoring.extractors.{task}: unknown extractor {extractor!r}; known: {sorted(EXTRACTORS)}")

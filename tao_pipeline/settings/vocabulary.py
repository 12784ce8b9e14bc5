"""The names settings may use for scorers and answer extractors.

Settings are checked when they load, before any scorer exists, so the vocabulary lives here,
below the domain; :mod:`tao_pipeline.scoring.catalog` and :mod:`tao_pipeline.scoring.extractors`
implement exactly these names (a test keeps the two in step).
"""

from __future__ import annotations

import math
import re
from typing import Any

SCORER_NAMES = (
    "self_consistency",
    "concise_format",
    "number_format",
    "json_valid",
    "regex_format",
    "length_limit",
    "instruction_following",
    "arithmetic_consistency",
    "sql_execution",
    "embedding_consensus",
    "reward_model",
    "self_certainty",
    "llm_judge",
    "feedback",
)
EXTRACTOR_NAMES = ("last_number", "first_line_number", "short_phrase", "final_line", "boxed", "math_verify")
PARAMETERISED_EXTRACTOR_NAMES = ("regex", "json_field")  # written "regex:<pattern>", "json_field:<dotted.path>"


def parse_extractor_spec(spec: str) -> tuple[str, str | None]:
    """'last_number' -> ('last_number', None); 'regex:<pattern>' -> ('regex', '<pattern>').

    Raises ValueError for an unknown name or a regular expression that does not compile.
    """
    name, sep, argument = spec.partition(":")
    if sep and name in PARAMETERISED_EXTRACTOR_NAMES:
        if name == "regex":
            try:
                re.compile(argument)
            except re.error as error:
                raise ValueError(f"extractor {spec!r}: bad regular expression: {error}") from None
        return name, argument
    if spec in EXTRACTOR_NAMES:
        return spec, None
    known = sorted(EXTRACTOR_NAMES) + [f"{n}:<arg>" for n in PARAMETERISED_EXTRACTOR_NAMES]
    raise ValueError(f"unknown answer extractor {spec!r}; known: {known}")


def check_scoring_names(
    scorers: dict[str, dict[str, float]],
    extractors: dict[str, str],
    gates: dict[str, list[str]] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Raise ValueError naming the first unknown scorer or extractor, or a missing default."""
    for table, name in ((scorers, "scoring.scorers"), (extractors, "scoring.extractors")):
        if "default" not in table:
            raise ValueError(f"{name} needs a 'default' entry")
    for task, weights in scorers.items():
        for scorer, weight in weights.items():
            _check_name(scorer, f"scoring.scorers.{task}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"scoring.scorers.{task}.{scorer}: weight must be a finite number >= 0, got {weight}")
    for task, names in (gates or {}).items():
        for scorer in names:
            _check_name(scorer, f"scoring.gates.{task}")
    for scorer, values in (options or {}).items():
        _check_name(scorer, "scoring.options")
        _check_finite(values, f"scoring.options.{scorer}")
    for task, extractor in extractors.items():
        try:
            parse_extractor_spec(extractor)
        except ValueError as error:
            raise ValueError(f"scoring.extractors.{task}: {error}") from None


def _check_finite(value: Any, where: str) -> None:
    """Every number in a scorer's options is finite: a timeout of inf or nan is a mistake, never a setting.

    Types and ranges are the scorers' own (their typed options, checked when the scorers are built
    at load, by ``check_scorers``); this catches what TOML's ``inf`` and ``nan`` let through even in
    nested tables and lists, when the settings load.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{where}[{index}]")


def _check_name(scorer: str, where: str) -> None:
    if scorer not in SCORER_NAMES:
        raise ValueError(f"{where}: unknown scorer {scorer!r}; known: {list(SCORER_NAMES)}")

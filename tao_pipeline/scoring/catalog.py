"""How each scorer named in settings is built.

The names themselves are the settings' vocabulary (:mod:`tao_pipeline.settings.vocabulary`);
this maps each one to its class. A factory takes the scorer's options
(``[scoring.options.<name>]`` in tao.toml) plus the scoring settings; heavy imports (models,
databases) happen only for scorers a task uses.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from pydantic import ValidationError

from tao_pipeline.scoring.base import Scorer
from tao_pipeline.settings import ScoringSettings

# name -> "module:Class"; every class takes its options as keyword arguments. self_consistency
# is built by the composite itself (it also extracts the answers).
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
    "self_certainty": "tao_pipeline.scoring.self_certainty:SelfCertaintyScorer",
    "llm_judge": "tao_pipeline.scoring.judge:LLMJudgeScorer",
    "feedback": "tao_pipeline.scoring.feedback:FeedbackScorer",
}


class ScorerOptionsError(ValueError):
    """A scorer's options are wrong (an unknown name, a bad value, a missing database or model); the
    message names the option."""


def build_named_scorer(name: str, settings: ScoringSettings, cache_dir: Path | None) -> Scorer:
    """Instantiate one scorer (not self_consistency, which the composite owns) from its options.

    Construction checks every option and the files they name without loading any model, so it is
    cheap enough to run when settings load; a problem raises ScorerOptionsError naming the option.
    """
    options = dict(settings.options.get(name, {}))
    defaults = {
        "concise_format": {"max_words": settings.concise_max_words},
        "number_format": {"max_words": settings.concise_max_words},
        "llm_judge": {"cache_dir": str(cache_dir / "judge") if cache_dir else None},
    }
    options = {**defaults.get(name, {}), **options}
    module_name, class_name = SCORER_CLASSES[name].split(":")
    scorer_class = getattr(importlib.import_module(module_name), class_name)
    known = sorted(inspect.signature(scorer_class).parameters)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ScorerOptionsError(f"scoring.options.{name}: unknown option {unknown[0]!r}; known: {known}")
    try:
        return scorer_class(**options)
    except ValidationError as error:  # a wrong type, a number that is not finite or out of its range
        raise ScorerOptionsError(_first_problem(name, error)) from None
    except (TypeError, ValueError, OSError) as error:  # OSError: a database or model folder that is not there
        message = str(error)
        raise ScorerOptionsError(
            message if message.startswith("scoring.options.") else f"scoring.options.{name}: {message}"
        ) from None


def _first_problem(name: str, error: ValidationError) -> str:
    """pydantic's report, several lines long, as one line naming the first bad option."""
    problem = error.errors()[0]
    option = ".".join(str(part) for part in problem["loc"])
    return f"scoring.options.{name}.{option}: {problem['msg']} (got {problem.get('input')!r:.80})"

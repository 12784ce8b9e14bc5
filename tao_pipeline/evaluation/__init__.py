"""Evaluation on held-out prompts that can't fool us, and the verdict that gates promotion.

For each held-out prompt (never trained on):

- champion vs challenger: both answer greedily; both answers are scored by the round's composite
  scorer against a reference pool of samples drawn from both models (the label-free win rate);
- test-time compute: the base model's pass@1, maj@k and best-of-k against the tuned greedy answer;
- the control arm (when trained): tuned on the same pairs with random preference directions.

Modules: ``evaluate`` (the comparison), ``tables`` (what a person reads), ``verdict`` (promotion,
control arm, the stored verdict), ``history`` (rounds so far, the collapse guard), ``plots``,
``report``, ``labels`` (read by evaluation only), and ``review`` (a round end to end).
"""

from tao_pipeline.evaluation.evaluate import EVALUATION_COLUMNS, Contender, evaluate
from tao_pipeline.evaluation.history import collapse_alerts, round_history
from tao_pipeline.evaluation.labels import load_labels
from tao_pipeline.evaluation.review import RoundEvaluation, RoundReview, evaluate_round, review_round
from tao_pipeline.evaluation.tables import (
    TEST_TIME_METHODS,
    has_control,
    has_labels,
    summarize,
    tuned_vs_sampling_table,
    win_rate,
)
from tao_pipeline.evaluation.verdict import (
    VERDICTS_TABLE,
    ControlVerdict,
    RoundVerdict,
    Verdict,
    compare_control,
    decide,
)

__all__ = [
    "EVALUATION_COLUMNS",
    "TEST_TIME_METHODS",
    "VERDICTS_TABLE",
    "Contender",
    "ControlVerdict",
    "RoundEvaluation",
    "RoundReview",
    "RoundVerdict",
    "Verdict",
    "collapse_alerts",
    "compare_control",
    "decide",
    "evaluate",
    "evaluate_round",
    "has_control",
    "has_labels",
    "load_labels",
    "review_round",
    "round_history",
    "summarize",
    "tuned_vs_sampling_table",
    "win_rate",
]

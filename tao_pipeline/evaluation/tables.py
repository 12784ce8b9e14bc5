"""The tables a person reads after a round: champion vs challenger per task, and test-time compute."""

from __future__ import annotations

import pandas as pd

from tao_pipeline.evaluation.evaluate import SIDES


def win_rate(outcomes: pd.Series) -> float:
    outcomes = outcomes.dropna()
    if outcomes.empty:
        return 0.0
    return float(((outcomes == "win").sum() + 0.5 * (outcomes == "tie").sum()) / len(outcomes))


def has_labels(rows: pd.DataFrame) -> bool:
    return bool(rows["champion_correct"].notna().any())


def has_control(rows: pd.DataFrame) -> bool:
    return bool(rows["control_response"].notna().any())


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """The before/after table: one row per metric (overall and per task), champion vs challenger (vs control)."""
    table = []
    for task, subset in [("all", rows), *sorted(rows.groupby("task"))]:
        table.append(_metric_row(f"label-free score ({task})", subset, "score"))
        if has_labels(subset):
            table.append(_metric_row(f"labeled accuracy ({task})", subset, "correct"))
        table.append(
            {
                "metric": f"challenger win rate ({task})",
                "champion": None,
                "challenger": round(win_rate(subset["outcome"]), 3),
                "control": round(win_rate(subset["control_outcome"]), 3) if has_control(subset) else None,
                "n": len(subset),
            }
        )
    table.append(_metric_row("mean response chars", rows, "chars"))
    table.append(_metric_row("median response chars", rows, "chars", statistic="median"))
    table.append(_metric_row("90th percentile response chars", rows, "chars", statistic=0.9))
    return pd.DataFrame(table, columns=["metric", "champion", "challenger", "control", "n"])


def _metric_row(metric: str, rows: pd.DataFrame, column: str, statistic: str | float = "mean") -> dict:
    values = {side: rows[f"{side}_{column}"].dropna().astype(float) for side in SIDES}

    def summary(v: pd.Series) -> float | None:
        if not len(v):
            return None
        return round(float(v.quantile(statistic) if isinstance(statistic, float) else v.agg(statistic)), 3)

    return {"metric": metric, **{side: summary(v) for side, v in values.items()}, "n": len(values["champion"])}


def tuned_vs_sampling_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Labeled accuracy per task: base pass@1, maj@k, best-of-k vs the tuned (and control) greedy answer.

    ``tuned_reaches_majority`` says whether one tuned greedy pass matches k base samples voting;
    without base sampling (``evaluation.test_time_k = 0``) the base columns are missing and it is None.
    """
    labeled = rows[rows["champion_correct"].notna()]
    table = []
    for task, subset in [("all", labeled), *sorted(labeled.groupby("task"))]:
        if subset.empty:
            continue
        # A table written by an older version may lack a column: that method shows as missing.
        accuracy = {
            name: mean_accuracy(subset[column]) if column in subset else None
            for name, column in TEST_TIME_METHODS.items()
        }
        majority = accuracy["base maj@k"]
        table.append(
            {
                "task": task,
                "n": len(subset),
                **accuracy,
                "tuned_reaches_majority": None if majority is None else accuracy["tuned greedy"] >= majority,
            }
        )
    return pd.DataFrame(table, columns=["task", "n", *TEST_TIME_METHODS, "tuned_reaches_majority"])


TEST_TIME_METHODS = {
    "base pass@1": "base_greedy_correct",
    "base one sample": "base_sample_accuracy",
    "base maj@k": "base_majority_correct",
    "base best-of-k": "base_best_of_k_correct",
    "champion greedy": "champion_correct",
    "tuned greedy": "challenger_correct",
    "control greedy": "control_correct",
}


def mean_accuracy(column: pd.Series) -> float | None:
    values = column.dropna().astype(float)
    return round(float(values.mean()), 3) if len(values) else None

"""The tables a person reads after a round: champion vs challenger per task, and test-time compute."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tao_pipeline.evaluation.evaluate import SIDES
from tao_pipeline.evaluation.significance import (
    accuracy_test,
    format_p,
    mean_interval,
    proportion_interval,
    win_rate_test,
)


def win_rate(outcomes: pd.Series) -> float:
    outcomes = outcomes.dropna()
    if outcomes.empty:
        return 0.0
    return float(((outcomes == "win").sum() + 0.5 * (outcomes == "tie").sum()) / len(outcomes))


def has_labels(rows: pd.DataFrame) -> bool:
    return bool(rows["champion_correct"].notna().any())


def has_control(rows: pd.DataFrame) -> bool:
    return bool(rows["control_response"].notna().any())


SUMMARY_COLUMNS = [
    "metric",
    "champion",
    "challenger",
    "difference",
    "champion_ci",
    "challenger_ci",
    "difference_ci",
    "control",
    "control_ci",
    "p_value",
    "n",
]


def summarize(rows: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The before/after table: one row per metric (overall and per task), champion vs challenger (vs control),
    each figure with its interval at ``confidence``; the challenger-minus-champion difference is paired.

    p_value: the sign test for win rates (one-sided, wins vs losses), McNemar's exact test for labeled
    accuracy (two-sided); the other rows are descriptive.
    """
    table = []
    for task, subset in [("all", rows), *sorted(rows.groupby("task"))]:
        table.append(_metric_row(f"label-free score ({task})", subset, "score", confidence))
        if has_labels(subset):
            table.append(_accuracy_row(f"labeled accuracy ({task})", subset, confidence))
        table.append(_win_rate_row(f"challenger win rate ({task})", subset, confidence))
    table.append(_metric_row("mean response chars", rows, "chars", confidence))
    table.append(_metric_row("median response chars", rows, "chars", confidence, statistic=np.median))
    table.append(_metric_row("90th percentile response chars", rows, "chars", confidence, statistic=_p90))
    return pd.DataFrame(table, columns=SUMMARY_COLUMNS)


def _p90(values, axis=-1):
    return np.quantile(values, 0.9, axis=axis)


def _metric_row(metric: str, rows: pd.DataFrame, column: str, confidence: float, statistic=np.mean) -> dict:
    values = {side: rows[f"{side}_{column}"].dropna().astype(float) for side in SIDES}
    row: dict = {"metric": metric, "n": len(values["champion"])}
    for side, v in values.items():
        if len(v):
            row[side] = round(float(statistic(v.to_numpy())), 3)
            row[f"{side}_ci"] = str(mean_interval(v.to_numpy(), confidence, statistic))
    paired = rows[[f"champion_{column}", f"challenger_{column}"]].dropna().astype(float)
    if len(paired) and statistic is np.mean:
        difference = (paired[f"challenger_{column}"] - paired[f"champion_{column}"]).to_numpy()
        row["difference"] = round(float(difference.mean()), 3)
        row["difference_ci"] = str(mean_interval(difference, confidence))
    return row


def _accuracy_row(metric: str, rows: pd.DataFrame, confidence: float) -> dict:
    test = accuracy_test(rows["champion_correct"], rows["challenger_correct"], confidence)
    row = {
        "metric": metric,
        "champion": round(test.champion, 3),
        "challenger": round(test.challenger, 3),
        "difference": round(test.difference, 3),
        "champion_ci": str(test.champion_interval),
        "challenger_ci": str(test.challenger_interval),
        "difference_ci": str(test.difference_interval),
        "p_value": format_p(test.mcnemar_p),
        "n": test.n,
    }
    control = rows["control_correct"].dropna().astype(float)
    if len(control):
        row["control"] = round(float(control.mean()), 3)
        row["control_ci"] = str(proportion_interval(int(control.sum()), len(control), confidence))
    return row


def _win_rate_row(metric: str, rows: pd.DataFrame, confidence: float) -> dict:
    test = win_rate_test(rows["outcome"].dropna(), confidence)
    row = {
        "metric": metric,
        "challenger": round(test.win_rate, 3),
        "challenger_ci": str(test.interval),
        "p_value": format_p(test.sign_test_p),
        "n": test.n,
    }
    if has_control(rows):
        control = win_rate_test(rows["control_outcome"].dropna(), confidence)
        row["control"], row["control_ci"] = round(control.win_rate, 3), str(control.interval)
    return row


def tuned_vs_sampling_table(rows: pd.DataFrame, confidence: float | None = None) -> pd.DataFrame:
    """Labeled accuracy per task: base pass@1, maj@k, best-of-k vs the tuned (and control) greedy answer.

    ``tuned_reaches_majority`` says whether one tuned greedy pass matches k base samples voting;
    without base sampling (``evaluation.test_time_k = 0``) the base columns are missing and it is None.
    With ``confidence``, each accuracy reads "0.412 [0.300, 0.530]" (Wilson interval), for people to read.
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
        shown = accuracy if confidence is None else _with_intervals(subset, accuracy, confidence)
        table.append(
            {
                "task": task,
                "n": len(subset),
                **shown,
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


def _with_intervals(subset: pd.DataFrame, accuracy: dict, confidence: float) -> dict:
    shown = {}
    for name, value in accuracy.items():
        column = TEST_TIME_METHODS[name]
        if value is None or name == "base one sample":  # a mean of fractions, not a count of successes
            shown[name] = value
            continue
        values = subset[column].dropna().astype(float)
        interval = proportion_interval(int(values.sum()), len(values), confidence)
        shown[name] = f"{value:.3f} {interval}"
    return shown

"""Plots a person looks at after a round, as PNG bytes (matplotlib, no display needed).

The assets embed them in Dagster metadata and the report writes them beside
``<home>/reports/<round>/report.md``.
"""

from __future__ import annotations

import io
import json

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation.tables import TEST_TIME_METHODS, tuned_vs_sampling_table

FIGURE_SIZE = (6.4, 3.6)
DPI = 90


def _figure():
    """A figure and its axes, drawn without pyplot: no global figure registry, no display, and matplotlib
    loads when a plot is drawn, not in every process that imports this module (the code location does)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE)
    return figure, figure.subplots()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def score_distribution_plot(scores: pd.DataFrame) -> bytes:
    """Histogram of candidate scores, one series per task."""
    figure, axis = _figure()
    for task, subset in sorted(scores.groupby("task")):
        axis.hist(subset["score"].astype(float), bins=20, range=(0, 1), alpha=0.6, label=f"{task} (n={len(subset)})")
    axis.set(title="Candidate scores", xlabel="label-free score", ylabel="responses")
    axis.legend(fontsize=8)
    return _png(figure)


def training_curves_plot(log_history: list[dict]) -> bytes:
    """Loss and reward margin (DPO) or reward (GRPO) per logged step."""
    frame = pd.DataFrame(log_history)
    figure, loss_axis = _figure()
    if "loss" in frame and "step" in frame:
        loss_axis.plot(frame["step"], frame["loss"], color="tab:blue", label="loss")
    loss_axis.set(title="Training", xlabel="step", ylabel="loss")
    margin = next((k for k in ("rewards/margins", "reward") if k in frame), None)
    if margin and "step" in frame:
        other = loss_axis.twinx()
        other.plot(frame["step"], frame[margin], color="tab:orange", label=margin)
        other.set_ylabel(margin)
        other.legend(loc="upper right", fontsize=8)
    loss_axis.legend(loc="upper left", fontsize=8)
    return _png(figure)


def accuracy_per_task_plot(rows: pd.DataFrame) -> bytes:
    """Labeled accuracy per task: the base model with test-time compute vs the greedy answers of each model."""
    table = tuned_vs_sampling_table(rows).set_index("task")
    methods = [m for m in TEST_TIME_METHODS if table[m].notna().any()]
    figure, axis = _figure()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        axis.bar([x + i * width for x in range(len(table))], table[method].fillna(0), width, label=method)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(table))], table.index)
    axis.set(title="Held-out accuracy per task", ylabel="accuracy", ylim=(0, 1))
    axis.legend(fontsize=7, ncol=3)
    return _png(figure)


def accuracy_per_round_plot(history: pd.DataFrame) -> bytes:
    figure, axis = _figure()
    rounds = history["round"]
    for column, label in [
        ("base_greedy_accuracy", "base pass@1"),
        ("base_majority_accuracy", "base maj@k"),
        ("accuracy_after", "tuned greedy"),
        ("control_accuracy", "control greedy"),
        ("reward_after", "tuned label-free score"),
    ]:
        if column in history and history[column].notna().any():
            axis.plot(rounds, history[column], marker="o", label=label, linestyle="--" if "reward" in column else "-")
    axis.set(title="Per round (held-out)", ylabel="accuracy / score", ylim=(0, 1))
    axis.legend(fontsize=8)
    return _png(figure)


def round_plots(lake: Lake, round_id: str, rows: pd.DataFrame, history: pd.DataFrame) -> dict[str, bytes]:
    """The round's plots by name: scores, training curves and, where labels exist, accuracy per task and round."""
    plots = {}
    if lake.exists("response_scores", round_id):
        plots["score_distribution"] = score_distribution_plot(lake.read("response_scores", round_id))
    plots["training_curves"] = training_curves_plot(log_history_of(lake.read("tuned_checkpoint", round_id)))
    if rows["champion_correct"].notna().any():
        plots["accuracy_per_task"] = accuracy_per_task_plot(rows)
        plots["accuracy_per_round"] = accuracy_per_round_plot(history)
    return plots


def log_history_of(table: pd.DataFrame) -> list[dict]:
    raw = table["log_history"].iloc[0] if "log_history" in table and len(table) else "[]"
    return json.loads(raw) if isinstance(raw, str) else []

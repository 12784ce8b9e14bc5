"""What a person looks at after a round: plots, the round history with its collapse guard, a markdown report.

Plots are PNG bytes (matplotlib, no display needed); the assets embed them in Dagster metadata
and the report writes them beside ``<home>/reports/<round>/report.md``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import pandas as pd  # noqa: E402

from tao_pipeline.evaluation import (  # noqa: E402
    ControlVerdict, Verdict, TEST_TIME_METHODS, compare_control, decide, has_labels, summarize,
    tuned_vs_sampling_table,
)
from tao_pipeline.lake import Lake  # noqa: E402
from tao_pipeline.settings import TaoSettings  # noqa: E402

FIGURE_SIZE = (6.4, 3.6)
DPI = 90
COLLAPSE_TOLERANCE = 0.005  # smaller moves of reward or accuracy are noise, not a trend


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def score_distribution_plot(scores: pd.DataFrame) -> bytes:
    """Histogram of candidate scores, one series per task."""
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    for task, subset in sorted(scores.groupby("task")):
        axis.hist(subset["score"].astype(float), bins=20, range=(0, 1), alpha=0.6, label=f"{task} (n={len(subset)})")
    axis.set(title="Candidate scores", xlabel="label-free score", ylabel="responses")
    axis.legend(fontsize=8)
    return _png(figure)


def training_curves_plot(log_history: list[dict]) -> bytes:
    """Loss and reward margin (DPO) or reward (GRPO) per logged step."""
    frame = pd.DataFrame(log_history)
    figure, loss_axis = plt.subplots(figsize=FIGURE_SIZE)
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
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        axis.bar([x + i * width for x in range(len(table))], table[method].fillna(0), width, label=method)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(table))], table.index)
    axis.set(title="Held-out accuracy per task", ylabel="accuracy", ylim=(0, 1))
    axis.legend(fontsize=7, ncol=3)
    return _png(figure)


def accuracy_per_round_plot(history: pd.DataFrame) -> bytes:
    figure, axis = plt.subplots(figsize=FIGURE_SIZE)
    rounds = history["round"]
    for column, label in [("base_greedy_accuracy", "base pass@1"), ("base_majority_accuracy", "base maj@k"),
                          ("accuracy_after", "tuned greedy"), ("control_accuracy", "control greedy"),
                          ("reward_after", "tuned label-free score")]:
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


# -- round history and the collapse guard --------------------------------------------------------


def round_history(lake: Lake) -> pd.DataFrame:
    """One row per evaluated round: the scorer's reward and held-out accuracy before and after tuning."""
    evaluated = lake.scan("checkpoint_evaluation")
    if evaluated is None:
        return pd.DataFrame()
    rows = lake.sql(f"SELECT * FROM {evaluated}")
    history = []
    for round_id, subset in sorted(rows.groupby("round")):
        labeled = has_labels(subset)
        history.append({
            "round": round_id,
            "starting_model": subset["champion_version"].iloc[0], "tuned_model": subset["challenger_version"].iloc[0],
            "train_reward": _train_reward(lake, round_id),
            "reward_before": _mean(subset["champion_score"]), "reward_after": _mean(subset["challenger_score"]),
            "accuracy_before": _mean(subset["champion_correct"]) if labeled else None,
            "accuracy_after": _mean(subset["challenger_correct"]) if labeled else None,
            "control_accuracy": _mean(subset["control_correct"]) if labeled else None,
            "base_greedy_accuracy": _mean(subset["base_greedy_correct"]) if labeled else None,
            "base_majority_accuracy": _mean(subset["base_majority_correct"]) if labeled else None,
        })
    return pd.DataFrame(history)


def _train_reward(lake: Lake, round_id: str) -> float | None:
    """Mean score of the round's own candidates: the reward the starting model earns on its samples."""
    return _mean(lake.read("response_scores", round_id)["score"]) if lake.exists("response_scores", round_id) else None


def _mean(column: pd.Series) -> float | None:
    values = column.dropna().astype(float)
    return round(float(values.mean()), 4) if len(values) else None


def collapse_alerts(history: pd.DataFrame) -> list[str]:
    """Rounds where the scorer's reward rose while held-out accuracy fell: the signature of reward hacking.

    Checked within a round (tuned vs starting model on the same reference pool) and across
    rounds (the reward each starting model earns on its own samples vs its held-out accuracy).
    Without labels there is no accuracy to compare, and no alert.
    """
    alerts = []
    for row in history.itertuples():
        if _rose_fell(row.reward_before, row.reward_after, row.accuracy_before, row.accuracy_after):
            alerts.append(f"{row.round}: reward rose {row.reward_before:.3f} -> {row.reward_after:.3f} while "
                          f"held-out accuracy fell {row.accuracy_before:.3f} -> {row.accuracy_after:.3f}")
    for before, after in zip(history.itertuples(), history.iloc[1:].itertuples()):
        if _rose_fell(before.train_reward, after.train_reward, before.accuracy_before, after.accuracy_before):
            alerts.append(f"{before.round} -> {after.round}: the starting model's own-sample reward rose "
                          f"{before.train_reward:.3f} -> {after.train_reward:.3f} while its held-out accuracy fell "
                          f"{before.accuracy_before:.3f} -> {after.accuracy_before:.3f}")
    return alerts


def _rose_fell(reward_then, reward_now, accuracy_then, accuracy_now) -> bool:
    values = (reward_then, reward_now, accuracy_then, accuracy_now)
    if any(v is None or v != v for v in values):
        return False
    return reward_now > reward_then + COLLAPSE_TOLERANCE and accuracy_now < accuracy_then - COLLAPSE_TOLERANCE


# -- the review of a round: verdicts, plots and the markdown report --------------------------------


@dataclass
class RoundReview:
    """What a round's evaluation concludes, and where its report was written."""

    verdict: Verdict
    control: ControlVerdict
    history: pd.DataFrame  # every evaluated round so far, this one included
    alerts: list[str]  # the collapse guard's
    plots: dict[str, bytes]
    report: Path

    @property
    def warnings(self) -> list[str]:
        return ([self.control.message] if self.control.alarm else []) + self.alerts


def review_round(lake: Lake, round_id: str, rows: pd.DataFrame, settings: TaoSettings) -> RoundReview:
    """Judge a round from its evaluation rows (already in the lake): promotion verdict, control arm,
    collapse guard across rounds, plots, and ``<reports>/<round>/report.md``."""
    verdict, control = decide(rows, settings.evaluation), compare_control(rows, settings.evaluation)
    history = round_history(lake)
    alerts = collapse_alerts(history)
    plots = round_plots(lake, round_id, rows, history)
    report = write_round_report(settings.reports_dir / round_id, round_id, rows, verdict, control, history,
                                alerts, plots)
    return RoundReview(verdict, control, history, alerts, plots, report)


def write_round_report(
    folder: Path, round_id: str, rows: pd.DataFrame, verdict: Verdict, control: ControlVerdict,
    history: pd.DataFrame, alerts: list[str], plots: dict[str, bytes],
) -> Path:
    """<folder>/report.md with the plots beside it; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (folder / f"{name}.png").write_bytes(png)
    lines = [
        f"# TAO {round_id}", "",
        f"**Verdict:** {'promoted' if verdict.promote else 'not promoted'}: {verdict.reason}", "",
        f"**Control arm:** {control.message}", "",
        "**Collapse guard:** " + ("; ".join(alerts) if alerts else "no round where reward rose while accuracy fell"),
        "", "## Champion vs challenger (held-out)", "", _markdown(summarize(rows)), "",
    ]
    test_time = tuned_vs_sampling_table(rows)
    if len(test_time) and test_time["base maj@k"].notna().any():
        k = int(rows["k"].iloc[0])
        lines += [f"## Test-time compute: base model with k={k} samples vs one tuned greedy pass", "",
                  _markdown(test_time), ""]
    if len(history):
        lines += ["## Rounds so far", "", _markdown(history), ""]
    lines += [f"![{name}]({name}.png)" for name in plots]
    path = folder / "report.md"
    staging = path.with_suffix(".md.tmp")
    staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    staging.replace(path)
    return path


def _markdown(table: pd.DataFrame) -> str:
    shown = table.dropna(axis=1, how="all")
    return shown.astype(object).where(shown.notna(), "-").to_markdown(index=False)


def log_history_of(table: pd.DataFrame) -> list[dict]:
    raw = table["log_history"].iloc[0] if "log_history" in table and len(table) else "[]"
    return json.loads(raw) if isinstance(raw, str) else []

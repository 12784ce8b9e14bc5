"""Every evaluated round in a row, and the collapse guard: reward rising while held-out accuracy falls."""

from __future__ import annotations

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation.significance import proportion_interval
from tao_pipeline.evaluation.tables import has_labels

EVALUATION_TABLE = "checkpoint_evaluation"
COLLAPSE_TOLERANCE = 0.005  # smaller moves of reward or accuracy are noise, not a trend
HISTORY_CONFIDENCE = 0.95  # the Wilson intervals of each round's held-out accuracy


def round_history(lake: Lake, current: tuple[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per evaluated round: the scorer's reward and held-out accuracy before and after tuning.

    ``current`` is a round being evaluated now, as (round, its evaluation rows): it replaces
    whatever the lake holds for that round.
    """
    except_round = current[0] if current else None
    evaluated = lake.scan(EVALUATION_TABLE, except_partition=except_round)
    rounds = dict(sorted(lake.sql(f"SELECT * FROM {evaluated}").groupby("round"))) if evaluated else {}
    if current is not None:
        rounds[current[0]] = current[1]
    return pd.DataFrame([_history_row(lake, round_id, rounds[round_id]) for round_id in sorted(rounds)])


def _history_row(lake: Lake, round_id: str, subset: pd.DataFrame) -> dict:
    labeled = has_labels(subset)
    return {
        "round": round_id,
        "starting_model": subset["champion_version"].iloc[0],
        "tuned_model": subset["challenger_version"].iloc[0],
        "train_reward": _train_reward(lake, round_id),
        "reward_before": _mean(subset["champion_score"]),
        "reward_after": _mean(subset["challenger_score"]),
        "accuracy_before": _mean(subset["champion_correct"]) if labeled else None,
        "accuracy_after": _mean(subset["challenger_correct"]) if labeled else None,
        "accuracy_before_ci": _interval(subset["champion_correct"]) if labeled else None,
        "accuracy_after_ci": _interval(subset["challenger_correct"]) if labeled else None,
        "control_accuracy": _mean(subset["control_correct"]) if labeled else None,
        "base_greedy_accuracy": _mean(subset["base_greedy_correct"]) if labeled else None,
        "base_majority_accuracy": _mean(subset["base_majority_correct"]) if labeled else None,
    }


def _train_reward(lake: Lake, round_id: str) -> float | None:
    """Mean score of the round's own candidates: the reward the starting model earns on its samples."""
    return _mean(lake.read("response_scores", round_id)["score"]) if lake.exists("response_scores", round_id) else None


def _interval(column: pd.Series, confidence: float = HISTORY_CONFIDENCE) -> str:
    values = column.dropna().astype(bool)
    return str(proportion_interval(int(values.sum()), len(values), confidence))


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
            alerts.append(
                f"{row.round}: reward rose {row.reward_before:.3f} -> {row.reward_after:.3f} while "
                f"held-out accuracy fell {row.accuracy_before:.3f} -> {row.accuracy_after:.3f}"
            )
    for before, after in zip(history.itertuples(), history.iloc[1:].itertuples()):
        if _rose_fell(before.train_reward, after.train_reward, before.accuracy_before, after.accuracy_before):
            alerts.append(
                f"{before.round} -> {after.round}: the starting model's own-sample reward rose "
                f"{before.train_reward:.3f} -> {after.train_reward:.3f} while its held-out accuracy fell "
                f"{before.accuracy_before:.3f} -> {after.accuracy_before:.3f}"
            )
    return alerts


def _rose_fell(reward_then, reward_now, accuracy_then, accuracy_now) -> bool:
    values = (reward_then, reward_now, accuracy_then, accuracy_now)
    if any(v is None or v != v for v in values):
        return False
    return reward_now > reward_then + COLLAPSE_TOLERANCE and accuracy_now < accuracy_then - COLLAPSE_TOLERANCE


def champion_collapse(history: pd.DataFrame, round_id: str) -> str | None:
    """The collapse alert that implicates ``round_id``'s starting model, a challenger promoted by the round
    before: its own-sample reward rose over its parent's while its held-out accuracy fell. None otherwise."""
    rounds = list(history.itertuples())
    for before, after in zip(rounds, rounds[1:]):
        promoted_then = after.starting_model == before.tuned_model
        if after.round == round_id and promoted_then:
            if _rose_fell(before.train_reward, after.train_reward, before.accuracy_before, after.accuracy_before):
                return (
                    f"{after.starting_model} (promoted by {before.round}): its own-sample reward rose "
                    f"{before.train_reward:.3f} -> {after.train_reward:.3f} while held-out accuracy fell "
                    f"{before.accuracy_before:.3f} -> {after.accuracy_before:.3f}"
                )
    return None

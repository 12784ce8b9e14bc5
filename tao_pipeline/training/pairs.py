"""Scores -> preference pairs: best vs worst candidate of a prompt, when the margin is clear.

A response whose score is unknown (a scorer failed on it) is never chosen or rejected: a judge
outage must not turn into training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from tao_pipeline.common.hashing import content_hash

PAIR_COLUMNS = [
    "pair_id",
    "prompt_id",
    "prompt",
    "system",
    "history",
    "task",
    "chosen_response_id",
    "rejected_response_id",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "margin",
]


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    unscored_responses: int = 0  # left out: their score is unknown
    dropped: dict[str, int] = field(
        default_factory=lambda: {"all_equal": 0, "below_margin": 0, "single_candidate": 0, "unscored": 0}
    )


def build_pairs(
    prompts: pd.DataFrame, candidates: pd.DataFrame, scores: pd.DataFrame, min_margin: float
) -> tuple[pd.DataFrame, PairStats]:
    """chosen = best-scored candidate, rejected = worst; ties broken by the shorter (chosen) or longer (rejected)."""
    table = (
        candidates[["response_id", "prompt_id", "response"]]
        .merge(scores[["response_id", "score"]], on="response_id")
        .merge(_with_history(prompts)[["prompt_id", "prompt", "system", "history", "task"]], on="prompt_id")
    )
    table["length"] = table["response"].str.len()
    stats = PairStats()
    rows = []
    stats.unscored_responses = int(table["score"].isna().sum())
    for prompt_id, everything in table.groupby("prompt_id", sort=True):
        stats.prompts += 1
        group = everything[everything["score"].notna()]
        reason = "unscored" if len(group) < min(2, len(everything)) else _drop_reason(group, min_margin)
        if reason:
            stats.dropped[reason] += 1
            continue
        best = group.sort_values(["score", "length", "response_id"], ascending=[False, True, True]).iloc[0]
        worst = group.sort_values(["score", "length", "response_id"], ascending=[True, False, True]).iloc[0]
        rows.append(
            {
                "pair_id": content_hash(best["response_id"], worst["response_id"]),
                "prompt_id": prompt_id,
                "prompt": best["prompt"],
                "system": best["system"],
                "history": best["history"],
                "task": best["task"],
                "chosen_response_id": best["response_id"],
                "rejected_response_id": worst["response_id"],
                "chosen": best["response"],
                "rejected": worst["response"],
                "chosen_score": best["score"],
                "rejected_score": worst["score"],
                "margin": best["score"] - worst["score"],
            }
        )
    stats.pairs = len(rows)
    return pd.DataFrame(rows, columns=PAIR_COLUMNS), stats


def _drop_reason(group: pd.DataFrame, min_margin: float) -> str | None:
    if len(group) < 2:
        return "single_candidate"
    spread = group["score"].max() - group["score"].min()
    if spread <= 1e-9:
        return "all_equal"
    if spread < min_margin:
        return "below_margin"
    return None


def shuffle_directions(pairs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The control arm's pairs: each pair's chosen and rejected swapped with probability 1/2 (deterministic).

    Same prompts, same responses, same amount of training; only the direction of preference is random.
    """
    flip = pairs["pair_id"].map(lambda pid: int(content_hash("control", str(seed), pid), 16) % 2 == 1)
    shuffled = pairs.copy()
    for a, b in [
        ("chosen", "rejected"),
        ("chosen_response_id", "rejected_response_id"),
        ("chosen_score", "rejected_score"),
    ]:
        shuffled.loc[flip, a], shuffled.loc[flip, b] = pairs.loc[flip, b], pairs.loc[flip, a]
    shuffled["margin"] = shuffled["chosen_score"] - shuffled["rejected_score"]
    return shuffled


def _with_history(prompts: pd.DataFrame) -> pd.DataFrame:
    """Prompts of rounds written before conversations have no history column: they are single-turn."""
    return prompts if "history" in prompts.columns else prompts.assign(history=None)

"""Held-out prompts pooled across rounds that ended with "not enough evidence".

A held-out prompt is held out by its hash, so no round ever trains on it: an earlier round's
held-out prompts are as unseen by this round's challenger as its own. When the rounds just before
this one kept the same champion for want of evidence, their held-out prompts join this round's,
and the next verdict rests on more prompts. The champion's answers to them come from the cache.
"""

from __future__ import annotations

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation.verdict import VERDICTS_TABLE, RoundVerdict

PROMPTS_TABLE = "raw_prompts"


def inconclusive_rounds_before(lake: Lake, round_id: str, champion_version: str) -> list[str]:
    """The rounds right before ``round_id`` (newest first) that kept ``champion_version`` for want of evidence."""
    rounds = []
    for earlier in reversed([r for r in lake.partitions(VERDICTS_TABLE) if r < round_id]):
        verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, earlier))
        if verdict.champion_version != champion_version or not verdict.promotion.not_enough_evidence:
            break
        rounds.append(earlier)
    return rounds


def heldout_prompts(lake: Lake, round_id: str, prompts: pd.DataFrame, champion_version: str, pool: bool):
    """This round's held-out prompts, plus (with ``pool``) those of the inconclusive rounds just before it.

    Returns (prompts, the rounds pooled from).
    """
    own = prompts[prompts["split"] == "heldout"]
    pooled_from = inconclusive_rounds_before(lake, round_id, champion_version) if pool else []
    if not pooled_from:
        return own, []
    earlier = [lake.read(PROMPTS_TABLE, r) for r in pooled_from if lake.exists(PROMPTS_TABLE, r)]
    earlier = [frame[frame["split"] == "heldout"] for frame in earlier]
    combined = pd.concat([own, *earlier], ignore_index=True).drop_duplicates("prompt_id", keep="first")
    return combined[own.columns].reset_index(drop=True), pooled_from

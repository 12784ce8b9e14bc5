"""The held-out pool: every round's held-out prompts, so far, newest first.

A held-out prompt is held out by its hash, so no round ever trains on it: an earlier round's
held-out prompts are as unseen by this round's challenger as its own. So every verdict can rest on
all of them, not only the round's own few dozen: the pool grows with traffic, and a later round's
small step becomes visible. The champion's answers to earlier prompts come from the response cache.

Kept honest: the pool is fixed from the lake before the challenger answers anything, each prompt
(by content hash) counts once, at most ``evaluation.max_heldout_prompts`` of them (this round's own
first, then earlier rounds', newest first), and an earlier prompt joins only if today's split still
holds it out (a changed ``data.heldout_fraction`` or ``split_salt`` could have put it in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.data.prompts import split_for
from tao_pipeline.settings import DataSettings

PROMPTS_TABLE = "raw_prompts"
HELDOUT = "heldout"


@dataclass
class HeldoutPool:
    prompts: pd.DataFrame  # this round's own held-out prompts first, then earlier rounds', newest first
    own: int  # how many are this round's own
    pooled_from: list[str] = field(default_factory=list)  # the earlier rounds that added any, newest first

    def describe(self) -> str:
        if not self.pooled_from:
            return f"{self.own} of this round's own (no earlier round's)"
        rounds = ", ".join(self.pooled_from[:3]) + (", ..." if len(self.pooled_from) > 3 else "")
        pooled = len(self.prompts) - self.own
        return f"{self.own} of this round's own + {pooled} from {len(self.pooled_from)} earlier rounds ({rounds})"


def heldout_prompts(
    lake: Lake, round_id: str, prompts: pd.DataFrame, data: DataSettings, pool: bool, limit: int | None
) -> HeldoutPool:
    """This round's held-out prompts and (with ``pool``) every earlier round's, each once, at most ``limit``."""
    own = _unique(prompts[prompts["split"] == HELDOUT], limit)
    if not pool:
        return HeldoutPool(own, len(own))
    frames, pooled_from, seen = [own], [], set(own["prompt_id"])
    for earlier in sorted((r for r in lake.partitions(PROMPTS_TABLE) if r < round_id), reverse=True):
        if limit is not None and len(seen) >= limit:
            break
        held = _still_held_out(lake.read(PROMPTS_TABLE, earlier), data)
        new = _unique(held[~held["prompt_id"].isin(seen)], None if limit is None else limit - len(seen))
        if not new.empty:
            frames.append(new.reindex(columns=own.columns))
            pooled_from.append(earlier)
            seen.update(new["prompt_id"])
    return HeldoutPool(pd.concat(frames, ignore_index=True), len(own), pooled_from)


def _still_held_out(frame: pd.DataFrame, data: DataSettings) -> pd.DataFrame:
    held = frame[frame["split"] == HELDOUT]
    today = [split_for(pid, data.heldout_fraction, data.split_salt) for pid in held["prompt_id"]]
    return held[[split == HELDOUT for split in today]]


def _unique(frame: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    unique = frame.drop_duplicates("prompt_id", keep="first").reset_index(drop=True)
    return unique if limit is None else unique.head(limit)

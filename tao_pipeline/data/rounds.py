"""Rounds: when the next one opens, and which prompts it trains on.

A round is one turn of the flywheel, keyed round-0001, round-0002, ... Every prompt is taken by
exactly one round (the first whose raw_prompts includes it), plus an optional replay of used
ones; the held-out split is a property of the prompt (by hash), so a held-out prompt stays
held out. Whoever opens a round (the round sensor, the schedule, `tao round`) follows
:func:`decide_next_round`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.prompts import PROMPT_COLUMNS, prompts_from_rows
from tao_pipeline.settings import DataSettings

USAGE_TABLE = "usage_logs"
PROMPTS_TABLE = "raw_prompts"
ROUND_PREFIX = "round-"


def round_key(number: int) -> str:
    return f"{ROUND_PREFIX}{number:04d}"


def next_round_key(existing: list[str]) -> str:
    numbers = [
        int(key[len(ROUND_PREFIX) :])
        for key in existing
        if key.startswith(ROUND_PREFIX) and key[len(ROUND_PREFIX) :].isdigit()
    ]
    return round_key(max(numbers, default=0) + 1)


@dataclass(frozen=True)
class RoundDecision:
    """The round to open now (``round_id``), or why none opens (``reason``)."""

    round_id: str | None
    reason: str
    waiting_round: str | None = None  # an open round that has not taken its prompts yet


def decide_next_round(lake: Lake, rounds: list[str], min_unused: int) -> RoundDecision:
    """Open the next round when at least ``min_unused`` prompts are unused, unless a round is still
    waiting to take its prompts (opening another now would count them twice).

    Rounds run one after another, so each starts from the champion the previous one decided. The
    round sensor asks for ``flywheel.min_new_prompts``, the schedule and `tao round` for 1 (0 when
    replaying used prompts).
    """
    waiting = [key for key in rounds if not lake.exists(PROMPTS_TABLE, key)]
    if waiting:
        return RoundDecision(None, f"{waiting[-1]} is open and has not taken its prompts yet", waiting[-1])
    unused = count_unused_prompts(lake)
    if unused < min_unused:
        return RoundDecision(None, f"{unused} unused prompts; a round opens at {min_unused}")
    return RoundDecision(next_round_key(rounds), f"{unused} unused prompts")


def count_unused_prompts(lake: Lake) -> int:
    """Distinct valid prompts in the usage logs that no round has taken yet."""
    logs = lake.scan(USAGE_TABLE)
    if logs is None:
        return 0
    used = lake.scan(PROMPTS_TABLE)
    where = f"WHERE prompt_id NOT IN (SELECT prompt_id FROM {used})" if used else ""
    return int(lake.sql(f"SELECT count(DISTINCT prompt_id) AS n FROM {logs} {where}")["n"].iloc[0])


def select_round_prompts(lake: Lake, round_id: str, limits: DataSettings, replay_fraction: float) -> pd.DataFrame:
    """The round's prompts: unused by any other round, plus a deterministic replay sample of used ones.

    Re-materializing a round keeps every prompt it already had (even if a later round replayed
    it) and adds the prompts that arrived since and no other round took.
    """
    logs = lake.scan(USAGE_TABLE)
    if logs is None:
        return pd.DataFrame(columns=PROMPT_COLUMNS)
    others = lake.scan(PROMPTS_TABLE, except_partition=round_id)
    used = set(lake.sql(f"SELECT DISTINCT prompt_id FROM {others}")["prompt_id"]) if others else set()
    replay = {pid for pid in used if _replayed(pid, round_id, replay_fraction)}
    own = set(lake.read(PROMPTS_TABLE, round_id)["prompt_id"]) if lake.exists(PROMPTS_TABLE, round_id) else set()
    # Filter in DuckDB so only the round's rows reach pandas, however many rows were ingested.
    taken = f"SELECT DISTINCT prompt_id FROM {others}" if others else "SELECT NULL::VARCHAR WHERE false"
    chosen = lake.sql(
        f"SELECT * FROM {logs} WHERE prompt_id NOT IN ({taken}) OR list_contains($keep::VARCHAR[], prompt_id) "
        "ORDER BY received_at, source_file, line_number",
        params={"keep": sorted(replay | own)},
    )
    return prompts_from_rows(chosen, limits)


def _replayed(prompt_id: str, round_id: str, fraction: float) -> bool:
    return fraction > 0 and int(content_hash("replay", round_id, prompt_id), 16) % 10_000 < fraction * 10_000

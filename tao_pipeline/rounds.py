"""Which prompts a round trains on: the usage-log prompts no other round has used, plus replay.

Every prompt is taken by exactly one round (the first whose raw_prompts includes it); the
held-out split is a property of the prompt (by hash), so a held-out prompt stays held out.
"""

from __future__ import annotations

import pandas as pd

from tao_pipeline.lake import Lake
from tao_pipeline.prompts import PROMPT_COLUMNS, content_hash, prompts_from_rows
from tao_pipeline.settings import DataSettings

USAGE_TABLE = "usage_logs"
PROMPTS_TABLE = "raw_prompts"


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
        "ORDER BY received_at, source_file, line_number", params={"keep": sorted(replay | own)})
    return prompts_from_rows(chosen, limits)


def _replayed(prompt_id: str, round_id: str, fraction: float) -> bool:
    return fraction > 0 and int(content_hash("replay", round_id, prompt_id), 16) % 10_000 < fraction * 10_000

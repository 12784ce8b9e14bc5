"""Scores already computed, by prompt group: a rerun scores only what changed.

A prompt group's key is the prompt (with its task and constraints) and its exact candidates;
the cache folder is keyed by the whole scoring configuration. Shards are written atomically as
they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.hashing import content_hash
from tao_pipeline.settings import ScoringSettings

SCORE_COLUMNS = ["response_id", "prompt_id", "task", "answer", "score", "score_parts", "failures"]


class ScoreCache:
    """Scored prompt groups under one scoring configuration, as atomically written Parquet shards."""

    def __init__(self, root: Path, settings: ScoringSettings):
        # Keyed by everything that changes a score (not by what only judges the scores afterwards).
        identity = settings.model_dump_json(exclude={"max_unscored_share"})
        self.folder = Path(root) / "scores" / content_hash(identity)[:16]
        self.cached_groups = 0  # prompt groups found in the cache by the last load
        self.scored_groups = 0  # prompt groups scored and saved since this cache was opened

    def load(self, keys: set[str]) -> pd.DataFrame:
        frames = [pd.read_parquet(p) for p in sorted(self.folder.glob("*.parquet"))] if self.folder.is_dir() else []
        frames = [f[f["group_key"].isin(keys)] for f in frames]
        table = (
            pd.concat([f for f in frames if len(f)], ignore_index=True)
            if any(len(f) for f in frames)
            else pd.DataFrame(columns=[*SCORE_COLUMNS, "group_key"])
        )
        self.cached_groups = int(table["group_key"].nunique())
        return table.drop_duplicates("response_id")

    def save(self, shard: pd.DataFrame) -> None:
        if shard.empty:
            return
        name = content_hash(*shard["group_key"].unique()) + ".parquet"
        with atomic_path(self.folder / name) as staging:
            shard.to_parquet(staging, index=False)
        self.scored_groups += int(shard["group_key"].nunique())

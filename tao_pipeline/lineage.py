"""Row-level lineage of a model version: rounds -> pairs -> responses -> prompts -> usage logs -> files."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tao_pipeline.lake import Lake
from tao_pipeline.model_store import ModelStore


@dataclass
class Lineage:
    chain: pd.DataFrame  # version, parent, round, method: newest first
    rounds: pd.DataFrame  # per round: pairs, prompts, usage-log rows, source files
    usage_logs: pd.DataFrame  # every usage-log row behind the version's pairs


def version_lineage(store: ModelStore, lake: Lake, version_id: str) -> Lineage:
    """Everything that shaped ``version_id``, through all its ancestors' rounds."""
    chain = store.ancestors(version_id)
    chain_table = pd.DataFrame([{"version_id": v.version_id, "parent_version": v.parent_version,
                                 "round": v.round, "method": v.method, "promoted": v.promoted} for v in chain])
    versions = [v.version_id for v in chain if v.round]
    checkpoints, pairs, prompts, logs = (lake.scan(t) for t in
                                         ("tuned_checkpoint", "preference_pairs", "raw_prompts", "usage_logs"))
    if not versions or None in (checkpoints, pairs, prompts, logs):
        empty = pd.DataFrame(columns=["round", "pairs", "prompts", "usage_log_rows", "source_files"])
        return Lineage(chain_table, empty, pd.DataFrame())
    listed = ", ".join(f"'{v}'" for v in versions)
    rows = lake.sql(f"""
        WITH used_pairs AS (
            SELECT t.version_id, t.round, unnest(t.pair_ids) AS pair_id FROM {checkpoints} t
            WHERE t.version_id IN ({listed})
        ), used_prompts AS (
            SELECT DISTINCT u.version_id, u.round, pp.pair_id, pp.prompt_id
            FROM used_pairs u JOIN {pairs} pp ON pp.pair_id = u.pair_id AND pp.round = u.round
        ), used_logs AS (
            SELECT p.version_id, p.round, p.pair_id, p.prompt_id, unnest(rp.log_ids) AS log_id
            FROM used_prompts p JOIN {prompts} rp ON rp.prompt_id = p.prompt_id AND rp.round = p.round
        )
        SELECT l.version_id, l.round, l.pair_id, l.prompt_id, l.log_id, ul.external_id,
               ul.source_file, ul.line_number, ul.received_at, ul.prompt
        FROM used_logs l JOIN {logs} ul ON ul.log_id = l.log_id
        ORDER BY l.round, ul.source_file, ul.line_number
    """)
    per_round = rows.groupby("round").agg(
        pairs=("pair_id", "nunique"), prompts=("prompt_id", "nunique"), usage_log_rows=("log_id", "nunique"),
        source_files=("source_file", lambda files: ", ".join(sorted(set(files)))),
    ).reset_index()
    return Lineage(chain_table, per_round, rows)

"""Row-level lineage of a model version: rounds -> pairs -> responses -> prompts -> usage logs -> files."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.registry.store import ModelStore


@dataclass
class Lineage:
    chain: pd.DataFrame  # version, parent, round, method: newest first
    rounds: pd.DataFrame  # per round: pairs (DPO), prompts, usage-log rows, source files
    usage_logs: pd.DataFrame  # every usage-log row behind the version's pairs


def version_lineage(store: ModelStore, lake: Lake, version_id: str) -> Lineage:
    """Everything that shaped ``version_id``, through all its ancestors' rounds (each built on its parent's
    answers; tuned from its parent's weights, or from those ``weights_from`` names: flywheel.start_from)."""
    chain = store.ancestors(version_id)
    chain_table = pd.DataFrame(
        [
            {
                "version_id": v.version_id,
                "parent_version": v.parent_version,
                "weights_from": v.tuned_from,
                "round": v.round,
                "method": v.method,
                "promoted": v.promoted,
            }
            for v in chain
        ]
    )
    versions = [v.version_id for v in chain if v.round]
    checkpoints, prompts, logs = (lake.scan(t) for t in ("tuned_checkpoint", "raw_prompts", "usage_logs"))
    if not versions or None in (checkpoints, prompts, logs):
        empty = pd.DataFrame(columns=["round", "pairs", "prompts", "usage_log_rows", "source_files"])
        return Lineage(chain_table, empty, pd.DataFrame())
    listed = ", ".join(f"'{v}'" for v in versions)
    rows = lake.sql(f"""
        WITH trained AS (
            SELECT version_id, round, len(pair_ids) AS pairs, unnest(prompt_ids) AS prompt_id
            FROM {checkpoints} WHERE version_id IN ({listed})
        ), used_logs AS (
            SELECT t.version_id, t.round, t.pairs, t.prompt_id, unnest(rp.log_ids) AS log_id
            FROM trained t JOIN {prompts} rp ON rp.prompt_id = t.prompt_id AND rp.round = t.round
        )
        SELECT l.version_id, l.round, l.pairs, l.prompt_id, l.log_id, ul.external_id,
               ul.source_file, ul.line_number, ul.received_at, ul.prompt
        FROM used_logs l JOIN {logs} ul ON ul.log_id = l.log_id
        ORDER BY l.round, ul.source_file, ul.line_number
    """)
    per_round = (
        rows.groupby("round")
        .agg(
            pairs=("pairs", "first"),
            prompts=("prompt_id", "nunique"),
            usage_log_rows=("log_id", "nunique"),
            source_files=("source_file", lambda files: ", ".join(sorted(set(files)))),
        )
        .reset_index()
    )
    return Lineage(chain_table, per_round, rows)

"""Usage-log rows -> deduplicated prompts with a deterministic train/held-out split.

A prompt's id is the hash of its content (system, text, constraints), so the same prompt logged
many times is one prompt that keeps every log row's id; its split is a property of that id.
"""

from __future__ import annotations

import pandas as pd

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.settings import DataSettings

DEFAULT_TASK = "general"
PROMPT_COLUMNS = [
    "prompt_id",
    "prompt",
    "system",
    "history",
    "task",
    "constraints",
    "split",
    "log_ids",
    "source_files",
]


def prompt_id_for(
    prompt: str, system: str | None = None, constraints: str | None = None, history: str | None = None
) -> str:
    """The content hash of a whole conversation; a single-turn prompt's id is what it was before conversations."""
    parts = (system or "", prompt.strip(), constraints or "")
    return content_hash(*parts, history) if history else content_hash(*parts)


def prompts_from_rows(rows: pd.DataFrame, limits: DataSettings) -> pd.DataFrame:
    """Usage-log rows -> one prompt per content hash (keeping every log id and source file), split and capped.

    ``rows`` has prompt_id, prompt, system, task, constraints, log_id and source_file.
    """
    if rows.empty:
        return pd.DataFrame(columns=PROMPT_COLUMNS)
    if "history" not in rows.columns:  # usage rows written before conversations
        rows = rows.assign(history=None)
    grouped = rows.groupby("prompt_id", sort=True)
    prompts = grouped[["prompt", "system", "history", "task", "constraints"]].first()
    prompts["log_ids"] = grouped["log_id"].agg(list)
    prompts["source_files"] = grouped["source_file"].agg(lambda files: list(dict.fromkeys(files)))
    prompts = prompts.reset_index()
    prompts["split"] = [split_for(pid, limits.heldout_fraction, limits.split_salt) for pid in prompts["prompt_id"]]
    return cap_splits(prompts[PROMPT_COLUMNS], limits).reset_index(drop=True)


def split_for(prompt_id: str, heldout_fraction: float, salt: str) -> str:
    bucket = int(content_hash(salt, prompt_id), 16) % 10_000
    return "heldout" if bucket < heldout_fraction * 10_000 else "train"


def cap_splits(prompts: pd.DataFrame, limits: DataSettings) -> pd.DataFrame:
    """Apply data.max_prompts / data.max_heldout, keeping a deterministic hash-ordered subset."""
    ordered = prompts.sort_values("prompt_id")
    train = ordered[ordered["split"] == "train"]
    heldout = ordered[ordered["split"] == "heldout"]
    if limits.max_prompts is not None:
        train = train.head(limits.max_prompts)
    if limits.max_heldout is not None:
        heldout = heldout.head(limits.max_heldout)
    return pd.concat([train, heldout])

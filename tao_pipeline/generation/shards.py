"""Generation in shards that survive a crash: a killed run resumes where it stopped.

Prompts are ordered by length (so each shard still batches similar lengths) and cut into
shards of ``shard_prompts``. A shard's file name is a hash of the model version, the sampling
parameters and the shard's prompt ids, and every shard is written atomically, so a rerun
reuses exactly the shards that finished and regenerates the rest. Each shard is generated
independently with the same seeds, so an interrupted run gives the same table as an
uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.generation.base import RESPONSE_COLUMNS, Generator, SamplingParams, sampling_json
from tao_pipeline.prompts import content_hash


def shard_plan(prompts: pd.DataFrame, shard_prompts: int) -> list[pd.DataFrame]:
    ordered = prompts.assign(_length=prompts["prompt"].str.len()).sort_values(["_length", "prompt_id"])
    ordered = ordered.drop(columns="_length")
    return [ordered.iloc[i : i + shard_prompts] for i in range(0, len(ordered), shard_prompts)]


def shard_name(model_version: str, params: SamplingParams, shard: pd.DataFrame) -> str:
    return content_hash(model_version, sampling_json(params), ",".join(shard["prompt_id"])) + ".parquet"


def generate_in_shards(
    generator: Generator, prompts: pd.DataFrame, params: SamplingParams, shard_dir: Path,
    shard_prompts: int, progress: bool = True,
) -> tuple[pd.DataFrame, int]:
    """All responses, reusing finished shards in ``shard_dir``; returns (table, shards reused)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    tables, reused = [], 0
    plan = shard_plan(prompts, shard_prompts)
    for shard in tqdm(plan, desc="shards", unit="shard", disable=not progress or len(plan) < 2):
        path = shard_dir / shard_name(generator.model_version, params, shard)
        if path.is_file():
            tables.append(pd.read_parquet(path))
            reused += 1
            continue
        table = generator.generate(shard, params, progress=progress)
        _write_atomically(table, path)
        tables.append(table)
    combined = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=RESPONSE_COLUMNS)
    return combined.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True), reused


def discard_shards(shard_dir: Path) -> None:
    """Once the whole table is in the lake, the shards are no longer needed."""
    shutil.rmtree(shard_dir, ignore_errors=True)


def _write_atomically(table: pd.DataFrame, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    table.to_parquet(staging, index=False)
    os.replace(staging, path)

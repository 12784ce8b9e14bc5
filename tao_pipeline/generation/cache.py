"""A response cache in crash-safe shards: nothing is generated twice for the same model and sampling.

Responses are cached per (model version, sampling parameters, prompt-length limit), in
``<home>/cache/generations/<model version>/<sampling digest>/``. Prompts not in the cache are
ordered by length (so a shard still batches similar lengths), cut into shards of
``shard_prompts`` and generated one shard at a time; each shard is written atomically the
moment it finishes. So:

- a killed run resumes where it stopped: the shards that finished are cache hits, and the
  rest are planned exactly as before (same shards, same seeds), giving the same table as an
  uninterrupted run;
- a rerun after new prompts arrive generates only the new prompts;
- evaluation reuses the base model's samples across rounds, and loads no model at all when
  everything it needs is cached.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.hashing import content_hash
from tao_pipeline.common.profiling import record_usage
from tao_pipeline.generation.base import RESPONSE_COLUMNS, GenerationStats, Generator, SamplingParams, sampling_json

CACHE_FOLDER = "generations"


@dataclass
class CacheStats:
    cached_prompts: int = 0
    generated_prompts: int = 0
    shards_written: int = 0


@dataclass
class LazyGenerator:
    """Loads the model only when a prompt is missing from the cache."""

    model_version: str
    build: Callable[[], Generator]
    _generator: Generator | None = field(default=None, init=False)
    _stats: GenerationStats = field(default_factory=GenerationStats, init=False)

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = self.build()
        return self._generator

    @property
    def loaded(self) -> bool:
        return self._generator is not None

    @property
    def stats(self) -> GenerationStats:
        """What this model generated, across loads (a closed generator's figures are kept)."""
        return getattr(self._generator, "stats", None) or self._stats

    def close(self) -> None:
        """A vLLM engine holds GPU memory until shut down; free it before the next model loads."""
        self._stats = self.stats
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()
        self._generator = None


class GenerationCache:
    def __init__(self, root: Path, shard_prompts: int, max_prompt_tokens: int):
        self.root = Path(root) / CACHE_FOLDER
        self.shard_prompts = shard_prompts
        self.max_prompt_tokens = max_prompt_tokens

    def folder(self, model_version: str, params: SamplingParams) -> Path:
        digest = content_hash(sampling_json(params), str(self.max_prompt_tokens))[:16]
        return self.root / _safe(model_version) / digest

    def generate(
        self,
        model: LazyGenerator,
        prompts: pd.DataFrame,
        params: SamplingParams,
        progress: bool = True,
    ) -> tuple[pd.DataFrame, CacheStats]:
        """One row per (prompt, sample) for ``prompts``: cached rows plus newly generated shards."""
        folder = self.folder(model.model_version, params)
        cached = _cached_rows(folder, set(prompts["prompt_id"]))
        missing = prompts[~prompts["prompt_id"].isin(set(cached["prompt_id"]))]
        stats = CacheStats(cached_prompts=int(cached["prompt_id"].nunique()), generated_prompts=len(missing))
        tables = [cached]
        plan = shard_plan(missing, self.shard_prompts)
        for shard in tqdm(plan, desc="shards", unit="shard", disable=not progress or len(plan) < 2):
            table = model.generator.generate(shard, params, progress=progress)
            record_usage(generated_tokens=int(table["completion_tokens"].sum()))  # cached rows cost nothing
            _write_atomically(table, folder / shard_name(shard))
            tables.append(table)
            stats.shards_written += 1
        combined = (
            pd.concat([t for t in tables if len(t)], ignore_index=True)
            if any(len(t) for t in tables)
            else pd.DataFrame(columns=RESPONSE_COLUMNS)
        )
        return combined.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True), stats


def shard_plan(prompts: pd.DataFrame, shard_prompts: int) -> list[pd.DataFrame]:
    ordered = prompts.assign(_length=prompts["prompt"].str.len()).sort_values(["_length", "prompt_id"])
    ordered = ordered.drop(columns="_length")
    return [ordered.iloc[i : i + shard_prompts] for i in range(0, len(ordered), shard_prompts)]


def shard_name(shard: pd.DataFrame) -> str:
    return content_hash(",".join(shard["prompt_id"])) + ".parquet"


def _cached_rows(folder: Path, wanted: set[str]) -> pd.DataFrame:
    """Rows of the wanted prompts from finished shards (a prompt found in two shards is taken once)."""
    frames = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        table = pd.read_parquet(path)
        table = table[table["prompt_id"].isin(wanted - seen)]
        if len(table):
            frames.append(table)
            seen |= set(table["prompt_id"])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESPONSE_COLUMNS)


def _write_atomically(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as staging:
        table.to_parquet(staging, index=False)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

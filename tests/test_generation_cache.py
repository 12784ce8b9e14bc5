"""The response cache: nothing generated twice for the same model and sampling; shards make it crash-safe."""

import pandas as pd
import pytest

from tao_pipeline.generation import GenerationCache, LazyGenerator, SamplingParams
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tests.helpers import three_prompts

PARAMS = SamplingParams(num_samples=2, max_new_tokens=6, temperature=1.0, seed=3)


@pytest.fixture
def model(tiny_model_dir):
    return LazyGenerator("tiny", lambda: TransformersGenerator(tiny_model_dir, "tiny", dtype="float32", batch_size=4))


def unloadable(version="tiny"):
    return LazyGenerator(version, lambda: pytest.fail("everything asked for should have come from the cache"))


def test_second_request_loads_no_model_and_returns_the_same_rows(tmp_path, model):
    cache = GenerationCache(tmp_path, shard_prompts=2, max_prompt_tokens=64)
    first, stats = cache.generate(model, three_prompts(), PARAMS, progress=False)
    assert (stats.cached_prompts, stats.generated_prompts, stats.shards_written) == (0, 3, 2)
    model.close()
    assert model.stats.responses == 6 and model.stats.new_tokens > 0  # the figures outlive the model
    again, stats = cache.generate(unloadable(), three_prompts(), PARAMS, progress=False)
    assert (stats.cached_prompts, stats.generated_prompts) == (3, 0)
    pd.testing.assert_frame_equal(first, again)


def test_only_new_prompts_are_generated(tmp_path, model):
    cache = GenerationCache(tmp_path, shard_prompts=8, max_prompt_tokens=64)
    prompts = three_prompts()
    cache.generate(model, prompts.iloc[:2], PARAMS, progress=False)
    model.close()
    combined, stats = cache.generate(model, prompts, PARAMS, progress=False)
    assert (stats.cached_prompts, stats.generated_prompts) == (2, 1)
    assert len(combined) == 6 and combined["response_id"].is_unique
    subset, stats = cache.generate(unloadable(), prompts.iloc[1:2], PARAMS, progress=False)
    assert stats.generated_prompts == 0 and set(subset["prompt_id"]) == {"p-b"}


def test_other_sampling_or_model_misses_the_cache(tmp_path, model):
    cache = GenerationCache(tmp_path, shard_prompts=8, max_prompt_tokens=64)
    cache.generate(model, three_prompts(), PARAMS, progress=False)
    greedy = SamplingParams(1, 6, greedy=True)
    _, stats = cache.generate(model, three_prompts(), greedy, progress=False)
    assert stats.generated_prompts == 3
    assert cache.folder("tiny", PARAMS) != cache.folder("tiny-v2", PARAMS) != cache.folder("tiny", greedy)
    assert cache.folder("tiny", PARAMS) != GenerationCache(tmp_path, 8, max_prompt_tokens=32).folder("tiny", PARAMS)


def test_a_lost_shard_is_regenerated_identically(tmp_path, model):
    """What a SIGKILL mid-generation leaves: some shards written, the rest missing; the rerun fills the gap."""
    cache = GenerationCache(tmp_path, shard_prompts=1, max_prompt_tokens=64)
    complete, _ = cache.generate(model, three_prompts(), PARAMS, progress=False)
    shards = sorted(cache.folder("tiny", PARAMS).glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    shards[-1].unlink()
    resumed, stats = cache.generate(model, three_prompts(), PARAMS, progress=False)
    assert (stats.cached_prompts, stats.generated_prompts) == (2, 1)
    pd.testing.assert_frame_equal(complete, resumed)
    assert not list(cache.folder("tiny", PARAMS).glob(".*.tmp"))

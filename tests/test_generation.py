"""tao_pipeline.generation: the transformers backend on the tiny random llama."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.generation import RESPONSE_COLUMNS, SamplingParams, build_generator
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tao_pipeline.registry import ModelNotFoundError
from tao_pipeline.settings import GenerationSettings, ModelSettings
from tests.helpers import three_prompts

MAX_NEW = 6


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)


@pytest.fixture
def prompts():
    return three_prompts()


def sampling(num_samples=3, **kwargs):
    return SamplingParams(num_samples, MAX_NEW, temperature=1.0, top_p=0.95, **kwargs)


def test_sampled_rows(generator, prompts):
    frame = generator.generate(prompts, sampling(3), progress=False)
    assert list(frame.columns) == RESPONSE_COLUMNS
    assert len(frame) == len(prompts) * 3
    assert sorted(frame["prompt_id"].unique()) == ["p-a", "p-b", "p-c"]
    assert frame.groupby("prompt_id")["sample_index"].apply(sorted).tolist() == [[0, 1, 2]] * 3
    assert frame["response_id"].is_unique
    assert set(frame["finish_reason"]) <= {"stop", "length"}
    assert (frame["completion_tokens"] >= 1).all()
    assert (frame["completion_tokens"] <= MAX_NEW).all()
    assert (frame.loc[frame["finish_reason"] == "length", "completion_tokens"] == MAX_NEW).all()
    assert (frame["prompt_tokens"] > 0).all()
    assert (frame["model_version"] == "tiny-v0").all()
    assert frame["response"].map(lambda r: isinstance(r, str)).all()
    assert json.loads(frame["sampling"].iloc[0]) == sampling(3).describe()
    # Rows come back sorted by prompt, then sample.
    assert list(zip(frame["prompt_id"], frame["sample_index"])) == sorted(
        zip(frame["prompt_id"], frame["sample_index"])
    )


def test_system_prompts_add_prompt_tokens(generator, prompts):
    both = pd.DataFrame(
        {
            "prompt_id": ["plain", "with-system"],
            "prompt": ["Name a colour.", "Name a colour."],
            "system": [np.nan, "You are a concise assistant."],
        }
    )
    frame = generator.generate(both, sampling(1), progress=False).set_index("prompt_id")
    assert frame.loc["with-system", "prompt_tokens"] > frame.loc["plain", "prompt_tokens"]
    none_system = both.assign(system=[None, None])
    assert len(generator.generate(none_system, sampling(1), progress=False)) == 2


def test_same_seed_same_output(generator, prompts):
    first = generator.generate(prompts, sampling(3, seed=11), progress=False)
    second = generator.generate(prompts, sampling(3, seed=11), progress=False)
    pd.testing.assert_frame_equal(first, second)
    other = generator.generate(prompts, sampling(3, seed=12), progress=False)
    assert not set(first["response_id"]) & set(other["response_id"])  # ids carry the sampling parameters
    assert first["response"].tolist() != other["response"].tolist()  # the seed really drives sampling


def test_greedy_gives_one_row_per_prompt(generator, prompts):
    greedy = SamplingParams(5, MAX_NEW, greedy=True)
    frame = generator.generate(prompts, greedy, progress=False)
    assert len(frame) == len(prompts)
    assert (frame["sample_index"] == 0).all()
    again = generator.generate(prompts.iloc[::-1].reset_index(drop=True), greedy, progress=False)
    assert frame["response"].tolist() == again["response"].tolist()


def test_batching_does_not_change_greedy_answers(tiny_model_dir, generator, prompts):
    greedy = SamplingParams(1, MAX_NEW, greedy=True)
    batched = generator.generate(prompts, greedy, progress=False)
    single = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=1)
    alone = single.generate(prompts, greedy, progress=False)
    assert batched["response"].tolist() == alone["response"].tolist()
    assert batched["completion_tokens"].tolist() == alone["completion_tokens"].tolist()


def test_stats_count_new_tokens(tiny_model_dir, prompts):
    fresh = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)
    frame = fresh.generate(prompts, sampling(2), progress=False)
    assert fresh.stats.prompts == 3
    assert fresh.stats.responses == 6
    assert fresh.stats.new_tokens == frame["completion_tokens"].sum() > 0
    assert fresh.stats.seconds > 0
    assert fresh.stats.tokens_per_second > 0


def test_build_generator_from_settings(tiny_model_dir, prompts):
    generator = build_generator(
        tiny_model_dir,
        "tiny-v1",
        GenerationSettings(batch_size=4),
        ModelSettings(base=str(tiny_model_dir), dtype="float32"),
    )
    assert isinstance(generator, TransformersGenerator)
    assert generator.batch_size == 4
    frame = generator.generate(prompts.head(1), SamplingParams(2, 4), progress=False)
    assert len(frame) == 2
    assert (frame["model_version"] == "tiny-v1").all()


def test_loading_a_missing_model_raises(tmp_path):
    with pytest.raises(ModelNotFoundError):
        TransformersGenerator(tmp_path / "missing", "v", dtype="float32")

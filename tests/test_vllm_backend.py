"""tao_pipeline.generation.vllm_backend: the vLLM backend against the transformers one.

The tests marked ``gpu`` need the ``gpu`` extra (vllm) and a CUDA GPU; without them they skip. The others
check the helpers both backends share and run everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.generation.base import (
    RESPONSE_COLUMNS,
    SamplingParams,
    eos_token_ids,
    response_id,
    response_row,
    sampling_json,
    split_at_stop,
)
from tao_pipeline.generation.vllm_backend import request_seed, vllm_available
from tests.helpers import three_prompts

MAX_NEW = 6


@pytest.fixture
def prompts():
    return three_prompts()


def sampling(num_samples=3, **kwargs):
    return SamplingParams(num_samples, MAX_NEW, temperature=1.0, top_p=0.95, **kwargs)


# --- Shared helpers (CPU, always run) ---------------------------------------------------------------------------


def test_shared_row_builder_keeps_the_response_id_recipe():
    params = sampling(4, seed=7)
    stored = json.dumps(params.describe(), sort_keys=True)  # the recipe every stored response id was made with
    assert sampling_json(params) == stored
    row = response_row(
        prompt_id="p-a",
        model_version="v1",
        sampling=stored,
        sample_index=2,
        text="5",
        prompt_tokens=11,
        kept_tokens=3,
        stopped=True,
    )
    assert list(row) == RESPONSE_COLUMNS
    assert row["response_id"] == content_hash("p-a", "v1", stored, "2") == response_id("p-a", "v1", stored, 2)
    assert (row["completion_tokens"], row["finish_reason"]) == (4, "stop")  # the stop token counts as generated
    capped = response_row(
        prompt_id="p-a",
        model_version="v1",
        sampling=stored,
        sample_index=2,
        text="5 6",
        prompt_tokens=11,
        kept_tokens=MAX_NEW,
        stopped=False,
    )
    assert (capped["completion_tokens"], capped["finish_reason"]) == (MAX_NEW, "length")
    assert capped["response_id"] == row["response_id"]  # the id names the sample, not what was sampled
    assert response_id("p-a", "v1", sampling_json(sampling(4, seed=8)), 2) != row["response_id"]
    assert response_id("p-a", "v2", stored, 2) != row["response_id"]

    # Stop tokens: transformers pads after EOS, vLLM ends on it; both keep what came before the first one.
    assert split_at_stop([5, 6, 2, 0, 0], {2, 3}) == ([5, 6], True)
    assert split_at_stop([5, 6, 3], {2, 3}) == ([5, 6], True)
    assert split_at_stop([5, 6, 7], {2, 3}) == ([5, 6, 7], False)
    assert eos_token_ids([2, 3], 3) == {2, 3}
    assert eos_token_ids(None, 4) == {4} and eos_token_ids(5, None) == {5}


def test_transformers_rows_use_the_shared_ids(tiny_model_dir, prompts):
    from tao_pipeline.generation.transformers_backend import TransformersGenerator

    generator = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)
    params = sampling(2, seed=3)
    frame = generator.generate(prompts, params, progress=False)
    assert (frame["sampling"] == sampling_json(params)).all()
    expected = [
        response_id(p, "tiny-v0", sampling_json(params), i) for p, i in zip(frame["prompt_id"], frame["sample_index"])
    ]
    assert frame["response_id"].tolist() == expected


def test_request_seeds_depend_on_the_prompt_not_its_position():
    seeds = [request_seed(0, p) for p in ("p-a", "p-b", "p-c")]
    assert seeds == [request_seed(0, p) for p in ("p-a", "p-b", "p-c")]
    assert len(set(seeds)) == 3
    assert request_seed(1, "p-a") != seeds[0]
    assert all(0 <= s < 2**31 - 64 for s in seeds)  # room for vLLM's seed + sample index


def test_backend_module_imports_vllm_lazily():
    # Importing the backend (as build_generator does) must not pull vllm in; only constructing one does.
    code = "import sys, tao_pipeline.generation.vllm_backend; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert isinstance(vllm_available(), bool)


# --- vLLM on a GPU ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_generator(tiny_model_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed (the 'gpu' extra): GPU tests skipped")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vLLM backend needs one")
    from tao_pipeline.generation.vllm_backend import VLLMGenerator

    # Small memory share and no CUDA graphs: a quick start for a 2-layer model.
    generator = VLLMGenerator(tiny_model_dir, "tiny-v0", gpu_memory_utilization=0.3, enforce_eager=True)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def reference(vllm_generator, tiny_model_dir):
    """The transformers backend on the same model, built after vLLM's engine so CUDA starts in one order."""
    from tao_pipeline.generation.transformers_backend import TransformersGenerator

    return TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)


@pytest.mark.gpu
def test_vllm_table_matches_transformers(vllm_generator, reference, prompts):
    params = sampling(3, seed=5)
    frame = vllm_generator.generate(prompts, params, progress=False)
    expected = reference.generate(prompts, params, progress=False)
    assert list(frame.columns) == RESPONSE_COLUMNS
    assert len(frame) == len(expected) == len(prompts) * 3
    keys = ["response_id", "prompt_id", "sample_index", "model_version", "sampling", "prompt_tokens"]
    pd.testing.assert_frame_equal(frame[keys], expected[keys])  # same ids, same prompt tokens, same order
    assert frame["response_id"].is_unique
    assert set(frame["finish_reason"]) <= {"stop", "length"}
    assert (frame["completion_tokens"] >= 1).all() and (frame["completion_tokens"] <= MAX_NEW).all()
    assert (frame.loc[frame["finish_reason"] == "length", "completion_tokens"] == MAX_NEW).all()
    assert frame["response"].map(lambda r: isinstance(r, str)).all()
    assert frame.dtypes.equals(expected.dtypes)


@pytest.mark.gpu
def test_vllm_greedy_is_one_deterministic_row_per_prompt(vllm_generator, reference, prompts):
    greedy = SamplingParams(5, MAX_NEW, greedy=True)
    frame = vllm_generator.generate(prompts, greedy, progress=False)
    assert len(frame) == len(prompts)
    assert (frame["sample_index"] == 0).all()
    assert frame["response_id"].tolist() == reference.generate(prompts, greedy, progress=False)["response_id"].tolist()
    again = vllm_generator.generate(prompts.iloc[::-1].reset_index(drop=True), greedy, progress=False)
    assert frame["response"].tolist() == again["response"].tolist()


@pytest.mark.gpu
def test_vllm_seeds_drive_sampling(vllm_generator, prompts):
    first = vllm_generator.generate(prompts, sampling(4, seed=11), progress=False)
    second = vllm_generator.generate(prompts, sampling(4, seed=11), progress=False)
    pd.testing.assert_frame_equal(first, second)
    other = vllm_generator.generate(prompts, sampling(4, seed=12), progress=False)
    assert not set(first["response_id"]) & set(other["response_id"])
    assert first["response"].tolist() != other["response"].tolist()
    assert first.groupby("prompt_id")["response"].nunique().max() > 1  # n samples of one prompt differ


@pytest.mark.gpu
def test_vllm_stats_and_availability(vllm_generator, prompts):
    assert vllm_available()
    before = vllm_generator.stats.prompts, vllm_generator.stats.responses, vllm_generator.stats.new_tokens
    frame = vllm_generator.generate(prompts, sampling(2), progress=False)
    assert vllm_generator.stats.prompts - before[0] == 3
    assert vllm_generator.stats.responses - before[1] == 6
    assert vllm_generator.stats.new_tokens - before[2] == frame["completion_tokens"].sum() > 0
    assert vllm_generator.stats.tokens_per_second > 0
    assert vllm_generator.generate(prompts.head(0), sampling(2), progress=False).columns.tolist() == RESPONSE_COLUMNS


def test_auto_backend_falls_back_to_transformers_without_a_gpu(tiny_model_dir):
    from tao_pipeline.generation import build_generator
    from tao_pipeline.generation.transformers_backend import TransformersGenerator
    from tao_pipeline.generation.vllm_backend import vllm_available
    from tao_pipeline.settings import GenerationSettings, ModelSettings

    generator = build_generator(
        tiny_model_dir, "tiny", GenerationSettings(backend="auto"), ModelSettings(dtype="float32")
    )
    assert isinstance(generator, TransformersGenerator) == (not vllm_available())

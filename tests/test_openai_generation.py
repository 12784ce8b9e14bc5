"""generation.backend = "openai": candidates from an OpenAI-compatible server (here `tao serve` on the tiny
model), through the response cache, refusing a server that serves another model, under a total deadline."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.generation import SamplingParams, build_generator, generate_candidates
from tao_pipeline.generation.openai_backend import EndpointError, OpenAIGenerator
from tao_pipeline.settings import SettingsError, load_settings
from tests.helpers import write_tiny_config
from tests.judge_server import FakeJudgeServer
from tests.serve_helpers import free_port, load, running_server, serve_config

PROMPTS = pd.DataFrame(
    {
        "prompt_id": ["p1", "p2", "p3"],
        "prompt": ["What is 1 + 1?", "Name a colour.", "What is 3 * 3?"],
        "system": [None, "Be brief.", None],
    }
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    config = serve_config(tmp_path_factory.mktemp("gen-serve"), tiny_model_dir, "log_requests = false")
    with running_server(load(config)) as running:
        yield running


def test_candidates_come_from_the_server_n_per_prompt_through_the_cache(server, tiny_model_dir, tmp_path):
    version = "base-" + tiny_model_dir.name
    settings = load_settings(
        None,
        [
            f"home='{tmp_path / 'home'}'",
            f"model.base='{tiny_model_dir}'",
            "generation.backend='openai'",
            f"generation.endpoint.base_url='{server.url}'",
            "generation.num_samples=3",
            "generation.max_new_tokens=6",
        ],
    )
    first = generate_candidates(PROMPTS, tiny_model_dir, version, settings)
    responses = first.responses
    assert len(responses) == 9 and set(responses["model_version"]) == {version}
    assert responses.groupby("prompt_id")["sample_index"].apply(sorted).tolist() == [[0, 1, 2]] * 3
    assert responses["completion_tokens"].between(1, 7).all() and responses["prompt_tokens"].gt(0).all()
    assert first.cache.generated_prompts == 3 and first.stats.new_tokens > 0
    again = generate_candidates(PROMPTS, tiny_model_dir, version, settings)
    assert again.cache.generated_prompts == 0
    assert again.responses["response_id"].tolist() == responses["response_id"].tolist()


def test_a_server_that_serves_another_model_is_refused(server, tiny_model_dir):
    with pytest.raises(EndpointError, match="not 'round-0007-dpo-abc'.*versions are never mixed"):
        OpenAIGenerator(tiny_model_dir, "round-0007-dpo-abc", base_url=server.url)
    # ...unless the operator says which served name that version has.
    mapped = OpenAIGenerator(tiny_model_dir, "round-0007-dpo-abc", base_url=server.url, served_name="tao")
    greedy = mapped.generate(PROMPTS.head(1), SamplingParams(1, 4, greedy=True), progress=False)
    assert len(greedy) == 1 and greedy["model_version"].iloc[0] == "round-0007-dpo-abc"


def test_an_unreachable_server_is_one_clear_error(tiny_model_dir):
    with pytest.raises(EndpointError, match="cannot list the models of http://127.0.0.1"):
        OpenAIGenerator(tiny_model_dir, "v1", base_url=f"http://127.0.0.1:{free_port()}/v1")


def test_the_deadline_holds_against_a_trickling_server_and_errors_are_retried(tiny_model_dir):
    models = '{"object": "list", "data": [{"id": "v1", "object": "model", "owned_by": "x"}]}'
    calls = []

    def reply(body, headers):
        if body is None:
            return 200, models
        calls.append(body)
        return (503, '{"error": {"message": "overloaded"}}') if len(calls) == 1 else (200, "{" + " " * 200, 0.05)

    fake = FakeJudgeServer(reply)
    try:
        # 3 s: room for the 503 and its retry on a loaded machine (at 1 s, the retry's backoff once did not fit),
        # far below the 10 s the trickle takes.
        generator = OpenAIGenerator(tiny_model_dir, "v1", base_url=fake.base_url, timeout_s=3.0, max_retries=3)
        started = time.monotonic()
        with pytest.raises(EndpointError, match="gave no answer for prompt p1 within 3s"):
            generator.generate(PROMPTS.head(1), SamplingParams(2, 4), progress=False)
        assert time.monotonic() - started < 4.5 and len(calls) >= 2  # the deadline held; the 503 was retried
    finally:
        fake.close()


def test_backend_openai_needs_an_endpoint():
    with pytest.raises(SettingsError, match="generation.endpoint.base_url"):
        load_settings(None, ["generation.backend='openai'"])
    with pytest.raises(SettingsError, match="generation.endpoint.base_url"):
        load_settings(None, ["evaluation.backend='openai'"])


def test_a_round_generates_through_the_server_and_evaluates_locally(server, tmp_path, tiny_model_dir):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    overrides = [
        "generation.backend='openai'",
        f"generation.endpoint.base_url='{server.url}'",
        "evaluation.backend='transformers'",
    ]
    report = run_round(str(config), overrides, echo=lambda *_: None)
    assert report.completed, report.failure
    settings = load_settings(config, overrides)
    candidates = Lake(settings.lake_dir).read("candidate_responses", report.round_id)
    assert set(candidates["model_version"]) == {"base-" + tiny_model_dir.name} and len(candidates) > 0
    assert isinstance(build_generator(tiny_model_dir, "base-" + tiny_model_dir.name, settings.generation,
                                      settings.model), OpenAIGenerator)  # fmt: skip

"""`tao serve --engine proxy` when its upstream freezes: /health says so, a request fails within its deadline
(not 3 x 120 s), the circuit opens and requests fail at once with Retry-After, and all recovers with the upstream.
The upstream is a real `tao serve` behind a TCP relay that can be frozen (connections accepted, nothing passes)."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.serve_helpers import Relay, load, running_server, serve_config

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture
def upstream(tmp_path, tiny_model_dir):
    settings = load(serve_config(tmp_path / "up", tiny_model_dir), "serve.log_requests=false")
    with running_server(settings) as running:
        relay = Relay(int(running.root.rsplit(":", 1)[1]))
        try:
            yield relay
        finally:
            relay.close()


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)


def test_a_frozen_upstream_shows_in_health_fails_fast_and_recovers(tmp_path, tiny_model_dir, upstream):
    settings = load(
        serve_config(tmp_path, tiny_model_dir),
        "serve.engine='proxy'",
        f"serve.upstream_url='{upstream.url}'",
        "serve.request_timeout_s=2",
        "serve.upstream_probe_seconds=0.3",
        "serve.breaker_failures=2",
        "serve.breaker_cooldown_s=60",  # longer than the test: only the probe's answer can close the circuit
    )
    with running_server(settings) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="none", max_retries=0, timeout=30)

        def health() -> requests.Response:
            return requests.get(proxy.root + "/health", timeout=10)

        wait_for(lambda: health().status_code == 200, 20, "the proxy to be healthy")
        assert client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2).choices

        upstream.frozen.set()
        wait_for(lambda: health().status_code == 503, 10, "/health to see the frozen upstream")
        assert health().json()["engine_status"]["upstream_error"]

        for _ in range(2):  # each fails within the deadline, and counts against the circuit
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
            assert caught.value.status_code in (502, 504) and time.monotonic() - started < 6
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert caught.value.status_code == 503 and time.monotonic() - started < 1  # the circuit is open: at once
        assert caught.value.code == "upstream_unavailable" and int(caught.value.response.headers["retry-after"]) >= 1
        assert health().json()["engine_status"]["circuit"] == "open"

        upstream.frozen.clear()
        # The probe the upstream answers is the trial call: the circuit closes then, not after the cooldown.
        wait_for(lambda: health().status_code == 200, 15, "/health to see the upstream back")
        assert health().json()["engine_status"]["circuit"] == "closed"
        assert client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2).choices


def test_an_upstreams_client_error_is_passed_on_not_a_502(tmp_path, tiny_model_dir, upstream):
    settings = load(
        serve_config(tmp_path, tiny_model_dir), "serve.engine='proxy'", f"serve.upstream_url='{upstream.url}'"
    )
    with running_server(settings) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="none", max_retries=0)
        wait_for(lambda: requests.get(proxy.root + "/health", timeout=10).ok, 20, "the proxy to be healthy")
        too_long = [{"role": "user", "content": " ".join(f"w{i}" for i in range(2000))}]
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model="tao", messages=too_long, max_tokens=2)
        assert requests.get(proxy.root + "/health", timeout=10).json()["engine_status"]["failures_in_a_row"] == 0


def test_a_silent_upstream_is_known_by_its_silence_not_at_the_deadline(tmp_path, tiny_model_dir, upstream):
    """The deadline is a minute, but the upstream says nothing for serve.upstream_stall_s: the request fails
    after the tries' silences (3 x 0.5 s and the client's back-off), not after a minute."""
    settings = load(
        serve_config(tmp_path, tiny_model_dir),
        "serve.engine='proxy'",
        f"serve.upstream_url='{upstream.url}'",
        "serve.request_timeout_s=60",
        "serve.upstream_stall_s=0.5",
    )
    with running_server(settings) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="none", max_retries=0, timeout=90)
        wait_for(lambda: requests.get(proxy.root + "/health", timeout=10).ok, 20, "the proxy to be healthy")
        whole = client.chat.completions.create(model="tao", messages=CHAT, max_tokens=6, temperature=0, n=2)
        assert len(whole.choices) == 2 and 0 < whole.usage.completion_tokens <= 12  # gathered from a stream
        upstream.frozen.set()
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert caught.value.status_code == 502 and time.monotonic() - started < 15


def test_a_proxied_challenger_that_ends_finishes_the_requests_it_was_given(upstream):
    """At a promotion or rollback the front closes its challenger's engine. A proxy's request waiting for the
    upstream's answer must finish first: closing its client under it failed such requests with 502s (two in
    the full-size bench-flywheel run of 2026-12-05, canary requests at the moment of promotion)."""
    import asyncio
    from pathlib import Path

    from tao_pipeline.registry import ModelVersion
    from tao_pipeline.serving.engine import GenerationRequest
    from tao_pipeline.serving.live import LiveRouter
    from tao_pipeline.serving.proxy import ProxyEngine

    async def scenario() -> None:
        engine = ProxyEngine(upstream.url, model_names={"challenger": "tao"})
        await engine.start(ModelVersion("challenger", Path("."), None, None, "dpo", False))
        router = LiveRouter(store=None, make_engine=lambda: engine, poll_seconds=0.05, drain_seconds=30)
        router.challenger = engine
        upstream.frozen.set()  # the upstream is slow to answer: the request waits for its response headers
        request = GenerationRequest(messages=CHAT, prompt=None, max_tokens=2, temperature=0.0)
        answer = asyncio.create_task(engine.complete(request))
        await asyncio.sleep(0.3)
        assert engine.status()["in_flight_requests"] == 1
        closing = asyncio.create_task(router._close_challenger())
        await asyncio.sleep(0.5)  # well past the grace of two polls
        assert not closing.done() and router.draining is engine  # it waits for the request it was given
        upstream.frozen.clear()
        completion = await asyncio.wait_for(answer, 30)
        assert completion.choices[0].finish_reason is not None
        await asyncio.wait_for(closing, 10)
        assert engine.status()["in_flight_requests"] == 0 and router.draining is None

    asyncio.run(scenario())


def test_a_champion_is_loaded_as_an_adapter_only_if_it_was_tuned_from_the_upstreams_base(tmp_path, upstream):
    """serve.load_lora_adapters: a LoRA adapter applies to the weights it was trained on. A champion tuned from
    another round's weights is refused with the reason; one tuned from the base (flywheel.start_from = "base"),
    whatever champion it was built on, is sent to the upstream (a `tao serve` here, which has no
    /v1/load_lora_adapter: vLLM's answer is what the real upstream would give)."""
    import asyncio

    from tao_pipeline.registry import ModelVersion
    from tao_pipeline.serving.engine import SwapError
    from tao_pipeline.serving.proxy import ProxyEngine

    (tmp_path / "checkpoint" / "adapter").mkdir(parents=True)
    stacked = ModelVersion("round-0002-dpo-a", tmp_path / "checkpoint", "round-0001-dpo-b", "round-0002", "dpo", False)
    retrained = ModelVersion(
        "round-0002-dpo-c", tmp_path / "checkpoint", "round-0001-dpo-b", "round-0002", "dpo", False, "base-x"
    )

    async def swap_to(champion: ModelVersion) -> str:
        engine = ProxyEngine(upstream.url, load_lora_adapters=True, upstream_base_version="base-x")
        try:
            with pytest.raises(SwapError) as refused:
                await engine.switch_to(champion)
            return str(refused.value)
        finally:
            await engine.close()

    assert "round-0002-dpo-a is not a LoRA adapter on base-x (it was tuned from round-0001-dpo-b)" in asyncio.run(
        swap_to(stacked)
    )
    assert f"did not load the adapter {tmp_path / 'checkpoint' / 'adapter'}" in asyncio.run(swap_to(retrained))

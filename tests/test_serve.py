"""`tao serve` called by the official openai client: chat and text completions, streaming, batching,
versions in every answer, the request log in the inbox, metrics, keys, bad requests, and hot swaps."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from click.testing import CliRunner

from tao_pipeline.cli import main
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.serving.request_log import RequestLog, recover_partial_files
from tao_pipeline.serving.server import ServeRefused, build_server, is_loopback
from tests.helpers import build_tiny_model
from tests.serve_helpers import free_port, jsonl_lines, load, register_checkpoint, running_server, serve_config


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> str:
    """The version id the registry gives the tiny base model."""
    return "base-" + tiny_model_dir.name


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """One server for the read-only tests here (nothing in them changes the champion)."""
    config = serve_config(tmp_path_factory.mktemp("serve"), tiny_model_dir)
    with running_server(load(config)) as running:
        yield running


def client_for(server, key: str = "none", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, **options)


def inbox_rows(server) -> list[dict]:
    server.app.state.request_log.flush()
    files = sorted(server.settings.inbox_dir.glob("serve-*.jsonl"))
    return [json.loads(line) for path in files for line in jsonl_lines(path)]


def test_chat_completion_names_the_version_in_the_body_and_the_header(server, base):
    raw = client_for(server).chat.completions.with_raw_response.create(
        model="tao", messages=CHAT, max_tokens=6, temperature=0
    )
    completion = raw.parse()
    assert raw.headers["x-tao-model-version"] == completion.model == base
    [choice] = completion.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 6


def test_streaming_gives_the_same_text_as_one_answer(server, base):
    client = client_for(server)
    whole = client.chat.completions.create(model="tao", messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tao", messages=CHAT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert {chunk.model for chunk in chunks} == {base}
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_and_several_samples(server, base):
    completion = client_for(server).completions.create(model="tao", prompt="Once upon a time", max_tokens=5, n=3)
    assert len(completion.choices) == 3 and completion.model == base
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert (
        completion.usage.completion_tokens == sum(1 for _ in completion.choices) * 5
        or completion.usage.completion_tokens > 0
    )


def test_models_lists_the_alias_and_the_champion(server, base):
    assert {model.id for model in client_for(server).models.list()} == {"tao", base}
    health = requests.get(server.root + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["model_version"] == base and health["engine"] == "local"


def test_concurrent_requests_are_batched_and_all_answered(server, base):
    client = client_for(server)
    before = len(server.engine.step_rows)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Question number {i}?"}]
        return client.chat.completions.create(model="tao", messages=messages, max_tokens=6).model

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(ask, range(16)))
    assert versions == [base] * 16
    steps = list(server.engine.step_rows)[before:]
    assert max(steps) > 1, steps  # rows of several requests were decoded in one step


def test_every_answer_is_logged_into_the_inbox_and_ingested(server, base):
    client = client_for(server)
    client.chat.completions.create(
        model="tao", messages=CHAT, max_tokens=4, n=2, metadata={"task": "arithmetic"}
    )  # two choices, two rows
    rows = [row for row in inbox_rows(server) if row["task"] == "arithmetic"]
    assert len(rows) >= 2
    row = rows[-1]
    assert row["request"]["messages"] == CHAT and row["request"]["metadata"] == {"task": "arithmetic"}
    assert row["model_version"] == base == row["response"]["model"]
    assert {"id", "request", "response", "task", "model_version", "latency_ms", "endpoint", "received_at"} == set(row)
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} == set(row["response"]["usage"])
    assert not list(server.settings.inbox_dir.glob("*.partial"))  # handed over whole

    all_rows = inbox_rows(server)
    config = serve_config(server.settings.home.parent, Path(server.settings.model.base))
    result = CliRunner().invoke(main, ["ingest", "--config", str(config), "--set", "flywheel.settle_seconds=0"])
    assert result.exit_code == 0, result.output
    logs = Lake(server.settings.lake_dir).sql(f"SELECT * FROM {Lake(server.settings.lake_dir).scan('usage_logs')}")
    served = logs[logs["external_id"].str.startswith(("chatcmpl-", "cmpl-"))]
    assert set(served["external_id"]) == {row["id"] for row in all_rows}  # every answer in, none lost


def test_metrics_are_prometheus_text(server, base):
    client_for(server).chat.completions.create(model="tao", messages=CHAT, max_tokens=3)
    text = requests.get(server.root + "/metrics", timeout=5).text
    assert 'tao_serve_requests_total{endpoint="chat",outcome="ok"}' in text
    assert f'tao_serve_model_info{{version="{base}"}} 1.0' in text
    assert "tao_serve_request_seconds_bucket" in text and 'tao_serve_tokens_total{kind="completion"}' in text


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "tao", "messages": CHAT, "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "gpt-5", "messages": CHAT}, 404, "gpt-5"),
        ({"model": "tao", "messages": [{"role": "system", "content": "x"}]}, 400, "role 'user'"),
        ({"model": "tao", "messages": []}, 400, "messages"),
        ({"model": "tao", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": "tao", "messages": CHAT, "temperature": -1}, 400, "temperature"),
        ({"model": "tao", "messages": CHAT, "n": 1000}, 400, "n"),
        ({"messages": CHAT}, 400, "model"),
    ],
)
def test_a_bad_request_gets_one_clear_error(server, body, status, words):
    answer = requests.post(server.url + "/chat/completions", json=body, timeout=10)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["type"]


def test_a_body_that_is_not_json_is_refused(server):
    answer = requests.post(
        server.url + "/chat/completions", data=b"{not json", headers={"content-type": "application/json"}, timeout=5
    )
    assert answer.status_code == 400 and "error" in answer.json()


def test_the_openai_client_sees_errors_as_its_own_exceptions(server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client_for(server).chat.completions.create(model="nope", messages=CHAT)


# -- keys and addresses -----------------------------------------------------------------------


def test_beyond_loopback_the_server_needs_keys(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TAO_SERVE_API_KEYS", raising=False)
    config = serve_config(tmp_path, tiny_model_dir)
    with pytest.raises(ServeRefused, match="TAO_SERVE_API_KEYS"):
        build_server(load(config, "serve.host='0.0.0.0'"))
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "TAO_SERVE_API_KEYS" in result.output and "Traceback" not in result.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.1")


def test_with_keys_every_api_call_needs_one(tmp_path, tiny_model_dir, monkeypatch, base):
    monkeypatch.setenv("TAO_SERVE_API_KEYS", "key-one, key-two")
    with running_server(load(serve_config(tmp_path, tiny_model_dir))) as running:
        with pytest.raises(openai.AuthenticationError):
            client_for(running, key="wrong").chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert requests.get(running.url + "/models", timeout=5).status_code == 401
        assert requests.get(running.root + "/metrics", timeout=5).status_code == 401
        assert requests.get(running.root + "/health", timeout=5).status_code == 200  # for load balancers
        answer = client_for(running, key="key-two").chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert answer.model == base


# -- what is logged ---------------------------------------------------------------------------


def test_log_options_leave_out_responses_and_fields(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, 'log_responses = false\ndrop_fields = ["system", "latency_ms"]')
    with running_server(load(config)) as running:
        answer = client_for(running).chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        [row] = inbox_rows(running)
    assert row["request"]["messages"] == [{"role": "user", "content": "What is 2 + 3?"}]  # no system message
    assert "latency_ms" not in row and row["id"] == answer.id
    response = row["response"]  # ids, model and usage kept; the text left out
    assert response["id"] == answer.id and response["model"] == answer.model and response["usage"]["total_tokens"]
    finish = answer.choices[0].finish_reason
    assert response["choices"] == [{"index": 0, "message": {"role": "assistant"}, "finish_reason": finish}]


def test_a_log_file_is_handed_over_whole_and_a_dead_servers_file_is_recovered(tmp_path):
    inbox = tmp_path / "inbox"
    log = RequestLog(inbox, roll_rows=3, roll_seconds=3600)
    log.start()
    for i in range(7):
        log.write({"id": str(i), "prompt": f"p{i}"})
    assert len(list(inbox.glob("serve-*.jsonl"))) == 2 and len(list(inbox.glob(".serve-*.partial"))) == 1
    log.close()
    files = sorted(inbox.glob("serve-*.jsonl"))
    assert sum(len(jsonl_lines(path)) for path in files) == 7 and not list(inbox.glob(".*"))

    # A server killed in the middle of a line: its file comes back without the broken line.
    dead = inbox / ".serve-999999999-1.jsonl.partial"
    dead.write_text('{"id": "a", "prompt": "whole"}\n{"id": "b", "prom')
    [recovered], [] = recover_partial_files(inbox)
    assert recovered.read_text() == '{"id": "a", "prompt": "whole"}\n' and not dead.exists()
    alive = inbox / f".serve-{os.getpid()}-9.jsonl.partial"  # a running server's file is left alone
    alive.write_text('{"id": "c"}\n')
    assert recover_partial_files(inbox) == ([], []) and alive.exists()


# -- hot swap ---------------------------------------------------------------------------------


def test_a_promotion_and_a_rollback_swap_the_model_without_failing_a_request(tmp_path, tiny_model_dir, base):
    settings = load(serve_config(tmp_path, tiny_model_dir))
    other_weights = build_tiny_model(tmp_path / "other", seed=1)
    with running_server(settings) as running:
        client = client_for(running)
        register_checkpoint(settings, other_weights, "round-0001-dpo-cafe", parent=base)
        answers, errors, stop = [], [], threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    answers.append(client.chat.completions.create(model="tao", messages=CHAT, max_tokens=4).model)
                except openai.OpenAIError as error:  # noqa: PERF203 - a failed request is what this test looks for
                    errors.append(error)

        senders = [threading.Thread(target=traffic) for _ in range(4)]
        for sender in senders:
            sender.start()
        time.sleep(1.0)
        ModelStore(settings.models_dir).record_promotion("round-0001-dpo-cafe", "promote", "test: a round promoted it")
        promoted_at = time.monotonic()
        while requests.get(running.root + "/health", timeout=5).json()["model_version"] != "round-0001-dpo-cafe":
            assert time.monotonic() - promoted_at < 10, "no swap within 10 s"
            time.sleep(0.1)
        swap_seconds = time.monotonic() - promoted_at
        time.sleep(1.0)
        ModelStore(settings.models_dir).rollback("test: regressed")
        while requests.get(running.root + "/health", timeout=5).json()["model_version"] != base:
            assert time.monotonic() - promoted_at < 20, "no swap back within 10 s"
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for sender in senders:
            sender.join()
        logged = {row["model_version"] for row in inbox_rows(running)}

    assert not errors, errors[:3]
    assert swap_seconds < 5
    assert answers[0] == base and answers[-1] == base and "round-0001-dpo-cafe" in answers
    assert logged == {base, "round-0001-dpo-cafe"}  # each row says which version wrote it


def test_a_champion_that_cannot_load_keeps_the_current_one_serving(tmp_path, tiny_model_dir, base):
    settings = load(serve_config(tmp_path, tiny_model_dir))
    with running_server(settings) as running:
        register_checkpoint(settings, tiny_model_dir, "round-0001-dpo-broken", parent=base)
        for weights in ModelStore(settings.models_dir).checkpoint_dir("round-0001-dpo-broken").glob("*.safetensors"):
            weights.unlink()
        ModelStore(settings.models_dir).record_promotion("round-0001-dpo-broken", "promote", "test")
        deadline = time.monotonic() + 10
        while not (health := requests.get(running.root + "/health", timeout=5).json())["last_swap_error"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health["model_version"] == base and "round-0001-dpo-broken" in health["last_swap_error"]
        answer = client_for(running).chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert answer.model == base


# -- proxy ------------------------------------------------------------------------------------


def test_the_proxy_engine_answers_through_an_upstream_and_follows_its_champion(tmp_path, tiny_model_dir, base):
    upstream_settings = load(serve_config(tmp_path / "up", tiny_model_dir), "serve.log_requests=false")
    other_weights = build_tiny_model(tmp_path / "other", seed=1)
    with running_server(upstream_settings) as upstream:
        proxy_settings = load(
            serve_config(tmp_path / "up", tiny_model_dir),
            "serve.engine='proxy'",
            f"serve.upstream_url='{upstream.url}'",
        )
        with running_server(proxy_settings) as proxy:
            client = client_for(proxy)
            answer = client.chat.completions.create(model="tao", messages=CHAT, max_tokens=4, temperature=0)
            direct = client_for(upstream).chat.completions.create(
                model="tao", messages=CHAT, max_tokens=4, temperature=0
            )
            assert answer.model == base and answer.choices[0].message.content == direct.choices[0].message.content
            streamed = client.chat.completions.create(
                model="tao", messages=CHAT, max_tokens=4, temperature=0, stream=True
            )
            assert (
                "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
                == direct.choices[0].message.content
            )

            register_checkpoint(proxy_settings, other_weights, "round-0001-dpo-beef", parent=base)
            ModelStore(proxy_settings.models_dir).record_promotion("round-0001-dpo-beef", "promote", "test")
            deadline = time.monotonic() + 15
            while (
                client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2).model != "round-0001-dpo-beef"
            ):
                assert time.monotonic() < deadline, requests.get(proxy.root + "/health", timeout=5).json()
                time.sleep(0.2)
            [row] = [r for r in inbox_rows(proxy) if r["model_version"] == "round-0001-dpo-beef"][:1]
            assert row["request"]["messages"] == CHAT and row["response"]["model"] == "round-0001-dpo-beef"


def test_a_proxy_started_before_its_upstream_answers_503_then_serves(tmp_path, tiny_model_dir, base):
    port = free_port()
    proxy_settings = load(
        serve_config(tmp_path, tiny_model_dir),
        "serve.engine='proxy'",
        f"serve.upstream_url='http://127.0.0.1:{port}/v1'",
    )
    with running_server(proxy_settings) as proxy:
        health = requests.get(proxy.root + "/health", timeout=5)
        assert health.status_code == 503 and "cannot list the models" in health.json()["last_swap_error"]
        with pytest.raises(openai.InternalServerError, match="no model loaded yet"):
            client_for(proxy).chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        upstream_settings = load(serve_config(tmp_path / "up", tiny_model_dir), "serve.log_requests=false")
        with running_server(upstream_settings, port=port):
            deadline = time.monotonic() + 15
            while requests.get(proxy.root + "/health", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "the proxy never found its upstream"
                time.sleep(0.2)
            answer = client_for(proxy).chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
            assert answer.model == base


def test_the_version_just_swapped_in_is_served_by_name_before_the_registry_is_read_again(
    tmp_path, tiny_model_dir, base, monkeypatch
):
    """/v1/models lists the new champion as soon as the engine has it; a proxy in front then names it. The registry
    read that follows the swap may wait on a lock: meanwhile a request naming the new version must not get 404
    (it did, in CI: a tao serve --engine proxy in front of a tao serve got 20 of 20 refused after a promotion)."""
    settings = load(serve_config(tmp_path, tiny_model_dir))
    other_weights = build_tiny_model(tmp_path / "other", seed=1)
    with running_server(settings) as running:
        register_checkpoint(settings, other_weights, "round-0001-dpo-cafe", parent=base)
        held, read_versions = threading.Event(), ModelStore.versions

        def versions_after_a_lock(store):  # the registry read after the swap, held up by another process's lock
            held.wait(30)
            return read_versions(store)

        monkeypatch.setattr(ModelStore, "versions", versions_after_a_lock)
        ModelStore(settings.models_dir).record_promotion("round-0001-dpo-cafe", "promote", "test: a round promoted it")
        deadline = time.monotonic() + 10
        while requests.get(running.root + "/health", timeout=5).json()["model_version"] != "round-0001-dpo-cafe":
            assert time.monotonic() < deadline, "no swap within 10 s"
            time.sleep(0.1)
        listed = {model.id for model in client_for(running).models.list()}
        answer = client_for(running).chat.completions.create(model="round-0001-dpo-cafe", messages=CHAT, max_tokens=2)
        held.set()
    assert "round-0001-dpo-cafe" in listed and answer.model == "round-0001-dpo-cafe"

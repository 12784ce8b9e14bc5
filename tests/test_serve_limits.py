"""`tao serve` against hostile and careless clients: the key and the body size checked before the body is read,
client mistakes as 400s in OpenAI's error shape (never a 500 or `{"detail": ...}`), limits from the model's
context, a bounded queue (429 + Retry-After), a deadline per request, and clients that leave are cancelled."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
import requests

from tests.serve_helpers import jsonl_lines, load, raw_exchange, running_server, serve_config

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]
# The tiny model writes its 400 tokens with this seed (checked by LONG's own test): a request that stays busy.
LONG = {"model": "tao", "messages": CHAT, "max_tokens": 400, "seed": 7, "temperature": 1.0, "n": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    config = serve_config(tmp_path_factory.mktemp("limits"), tiny_model_dir, "max_body_bytes = 65536\nmax_messages = 8")
    with running_server(load(config)) as running:
        yield running


def client_for(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)


def openai_shaped(answer: requests.Response | httpx.Response) -> dict:
    body = answer.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


def post_raw(server, body: bytes, path: str = "/chat/completions") -> requests.Response:
    return requests.post(server.url + path, data=body, headers={"content-type": "application/json"}, timeout=30)


# -- client mistakes: 400 in OpenAI's shape, never 500 ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "seed": 1e30}', "seed"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', "seed"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "seed": -9223372036854775809}', "seed"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "seed": 1.5}', "seed"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "a \\ud800 b"}]}', "messages[0].content"),
        (
            b'{"model": "tao", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages[0].content[0].text",
        ),
        (
            b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "metadata": {"task": "\\ud83d"}}',
            "metadata.task",
        ),
        (
            b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": "x"}}',
            "metadata",
        ),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop[0]"),
        (b'{"model": "tao\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "metadata": {"task": 3}}', "metadata"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "n": 17}', "n"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', "stop"),
        (b'{"model": "tao", "messages": "hi"}', "messages"),
        (b'{"model": "tao", "messages": [{"role": "user", "content": "\xff\xfe not utf-8"}]}', None),
        (b'{"model": "tao", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}", None),
        (b"[1, 2, 3]", None),
        (b'"just a string"', None),
        (b"", None),
    ],
)
def test_a_client_mistake_is_a_400_in_openais_shape(server, body, param):
    answer = post_raw(server, body)
    assert answer.status_code == 400, answer.text
    error = openai_shaped(answer)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_a_lone_surrogate_in_a_text_completion_prompt_is_a_400(server):
    answer = post_raw(server, b'{"model": "tao", "prompt": "x\\udc80y"}', "/completions")
    assert answer.status_code == 400 and openai_shaped(answer)["param"] == "prompt"


def test_seeds_at_the_edges_of_64_bits_are_answered(server):
    for seed in (-(2**63), 2**63 - 1, 0, -1):
        answer = client_for(server).chat.completions.create(model="tao", messages=CHAT, max_tokens=2, seed=seed)
        assert answer.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nowhere", 404), ("DELETE", "/v1/chat/completions", 405), ("GET", "/v1/chat/completions", 405)],
)
def test_routing_errors_have_openais_shape_too(server, method, path, status):
    answer = requests.request(method, server.root + path, timeout=10)
    assert answer.status_code == status and openai_shaped(answer)


def test_too_many_turns_is_a_400(server):
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(9)]
    answer = requests.post(server.url + "/chat/completions", json={"model": "tao", "messages": turns}, timeout=10)
    assert answer.status_code == 400 and openai_shaped(answer)["param"] == "messages"


# -- the model's context -------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused_before_any_generation(server):
    steps = server.engine.steps
    long_prompt = " ".join(f"word{i}" for i in range(2000))  # the tiny model's context is 512 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(
            model="tao", messages=[{"role": "user", "content": long_prompt}], max_tokens=2
        )
    assert caught.value.code == "context_length_exceeded" and "512" in caught.value.message
    assert server.engine.steps == steps


def test_max_tokens_beyond_the_context_is_refused_and_the_default_is_shortened(tmp_path, tiny_model_dir):
    settings = load(serve_config(tmp_path, tiny_model_dir), "serve.default_max_tokens=4000")
    with running_server(settings) as running:
        prompt = [{"role": "user", "content": "x " * 200}]
        with pytest.raises(openai.BadRequestError, match="maximum context length is 512") as caught:
            client_for(running).chat.completions.create(model="tao", messages=prompt, max_tokens=400)
        assert caught.value.param == "max_tokens"
        answer = client_for(running).chat.completions.create(model="tao", messages=prompt)  # the default, shortened
        assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= 512


def test_one_bad_request_among_concurrent_ones_fails_alone(server):
    """A prompt too long for the model, sent with 7 good requests: 7 answers and one 400."""
    client = client_for(server)
    bad = [{"role": "user", "content": " ".join(f"w{i}" for i in range(2000))}]

    def ask(i: int):
        try:
            messages = bad if i == 3 else [{"role": "user", "content": f"Question {i}?"}]
            return client.chat.completions.create(
                model="tao", messages=messages, max_tokens=6, temperature=0.5 + i / 10
            )
        except openai.APIStatusError as error:
            return error

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert isinstance(results[3], openai.BadRequestError)
    assert all(not isinstance(result, Exception) for i, result in enumerate(results) if i != 3), results


# -- the gate: key and body size before the body is read ------------------------------------------------


def port_of(server) -> int:
    return int(server.root.rsplit(":", 1)[1])


def test_a_body_declared_too_large_is_refused_before_it_is_read(server):
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 2**20}"
    )
    started = time.monotonic()
    status, headers, body = raw_exchange(port_of(server), head, b'{"model": "tao", ', timeout=10)
    assert status == 413 and time.monotonic() - started < 5  # not 200 MB later: nothing more was sent
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_cut_at_the_limit(server):
    def chunks():
        yield b'{"model": "tao", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 4096

    answer = requests.post(
        server.url + "/chat/completions", data=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    assert answer.status_code == 413 and openai_shaped(answer)["code"] == "request_too_large"


def test_a_body_that_never_arrives_gets_408(tmp_path, tiny_model_dir):
    with running_server(load(serve_config(tmp_path, tiny_model_dir, "body_timeout_s = 0.5"))) as running:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100"
        status, _, body = raw_exchange(port_of(running), head, b'{"model"', timeout=10)
    assert status == 408 and "body_timeout_s" in json.loads(body)["error"]["message"]


def test_with_keys_the_key_is_checked_before_the_body_and_docs_need_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TAO_SERVE_API_KEYS", "the-key")
    with running_server(load(serve_config(tmp_path, tiny_model_dir))) as running:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer wrong\r\nContent-Length: 500000"
        )
        status, _, body = raw_exchange(port_of(running), head, b"{", timeout=10)  # 1 byte of 500,000 sent
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        for path in ("/docs", "/openapi.json", "/redoc", "/metrics", "/v1/models"):
            answer = requests.get(running.root + path, timeout=10)
            assert answer.status_code == 401 and openai_shaped(answer), path
            assert requests.get(running.root + path, headers={"Authorization": "Bearer the-key"}, timeout=10).ok
        assert requests.get(running.root + "/health", timeout=10).status_code == 200


def test_without_keys_on_loopback_the_docs_are_open(server):
    assert requests.get(server.root + "/openapi.json", timeout=10).ok


# -- a bounded queue, a deadline, and clients that leave -------------------------------------------------


def wait_for(condition, seconds: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def health(server) -> dict:
    return requests.get(server.root + "/health", timeout=10).json()


def test_the_long_request_is_long(server):
    """LONG writes all its tokens on the tiny model: the tests below rely on it being busy that long."""
    answer = requests.post(server.url + "/chat/completions", json=LONG, timeout=120).json()
    assert answer["usage"]["completion_tokens"] >= 600, answer["usage"]


def test_a_full_server_answers_429_with_retry_after(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, "max_batch_rows = 2\nmax_queued_rows = 0")
    with running_server(load(config)) as running:
        first = threading.Thread(
            target=requests.post, args=(running.url + "/chat/completions",), kwargs={"json": LONG, "timeout": 120}
        )
        first.start()
        wait_for(lambda: health(running)["rows_in_flight"] == 2, what="the first request")
        refused = requests.post(running.url + "/chat/completions", json={"model": "tao", "messages": CHAT}, timeout=30)
        first.join()
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert openai_shaped(refused)["type"] == "rate_limit_error"
        metrics = requests.get(running.root + "/metrics", timeout=10).text
        assert 'tao_serve_requests_total{endpoint="chat",outcome="busy"} 1.0' in metrics
        again = client_for(running).chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
        assert again.choices  # the slot came back


def test_a_request_past_its_deadline_gets_504_and_stops_costing(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, "request_timeout_s = 0.3")
    with running_server(load(config)) as running:
        answer = requests.post(running.url + "/chat/completions", json=LONG, timeout=60)
        assert answer.status_code == 504 and openai_shaped(answer)["code"] == "timeout"
        with pytest.raises(openai.APIError, match="request_timeout_s"):
            list(client_for(running).chat.completions.create(**{**LONG, "n": 1}, stream=True))
        wait_for(lambda: health(running)["engine_status"]["running_rows"] == 0, 10, "the rows to leave")
        assert health(running)["rows_in_flight"] == 0


def logged_rows(server) -> int:
    server.app.state.request_log.flush()
    return sum(len(jsonl_lines(path)) for path in server.settings.inbox_dir.glob("serve-*.jsonl"))


def test_a_client_that_hangs_up_is_cancelled_and_not_logged(tmp_path, tiny_model_dir):
    with running_server(load(serve_config(tmp_path, tiny_model_dir))) as running:
        rows_before, steps_before = logged_rows(running), running.engine.steps
        body = json.dumps(LONG).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}"
        )
        with socket.create_connection(("127.0.0.1", port_of(running))) as connection:
            connection.sendall(head.encode() + b"\r\n\r\n" + body)
            wait_for(lambda: health(running)["engine_status"]["running_rows"] == 2, what="the request to start")
        # the client is gone: its rows leave the batch long before their 400 tokens
        wait_for(lambda: health(running)["engine_status"]["running_rows"] == 0, 10, "the rows to leave")
        assert running.engine.steps - steps_before < 300
        wait_for(lambda: health(running)["rows_in_flight"] == 0, 10, "the slot to come back")

        with httpx.stream("POST", running.url + "/chat/completions", json={**LONG, "stream": True}, timeout=30) as sse:
            next(sse.iter_lines())  # the first event, then hang up
        wait_for(lambda: health(running)["engine_status"]["running_rows"] == 0, 10, "the streamed rows to leave")
        assert logged_rows(running) == rows_before  # nobody received those answers: no training rows
        text = requests.get(running.root + "/metrics", timeout=10).text
        assert 'tao_serve_requests_total{endpoint="chat",outcome="cancelled"} 2.0' in text


def test_a_client_that_leaves_while_queued_costs_nothing(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, "max_batch_rows = 2")
    with running_server(load(config)) as running:
        first = threading.Thread(
            target=requests.post, args=(running.url + "/chat/completions",), kwargs={"json": LONG, "timeout": 120}
        )
        first.start()
        wait_for(lambda: health(running)["engine_status"]["running_rows"] == 2, what="the first request")
        started = running.engine.requests_started
        with pytest.raises(httpx.TimeoutException):
            httpx.post(running.url + "/chat/completions", json={**LONG, "n": 1}, timeout=0.3)
        wait_for(lambda: health(running)["rows_in_flight"] == 2, 10, "the queued request to be dropped")
        first.join()
        assert running.engine.requests_started == started  # never prefilled, never decoded

"""`POST /v1/feedback`: what a user did with an answer, sent with the answer's id (the `openai` client's
`completion.id`), checked, and written into the inbox beside the answer's rows; bad feedback gets one clear line."""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import openai
import pytest
import requests

from tests.serve_helpers import jsonl_lines, load, running_server, serve_config

KEY = "feedback-test-key"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
SOME_ID = "chatcmpl-" + "0" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as patch:  # with keys: feedback is authenticated like every endpoint
        patch.setenv("TAO_SERVE_API_KEYS", KEY)
        with running_server(load(serve_config(tmp_path_factory.mktemp("serve"), tiny_model_dir))) as running:
            yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def post(server, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/feedback", json=body, headers=headers, timeout=10)


def inbox_rows(server) -> list[dict]:
    files = sorted(server.settings.inbox_dir.glob("serve-*.jsonl"))
    return [json.loads(line) for path in files for line in jsonl_lines(path)]


def wait_for_row(server, ident: str, seconds: float = 15.0) -> dict:
    """The row once its log file has rolled into the inbox by itself (serve.log_roll_seconds), not flushed."""
    deadline = time.monotonic() + seconds
    while not (found := [row for row in inbox_rows(server) if row["id"] == ident]):
        assert time.monotonic() < deadline, f"{ident} never reached the inbox"
        time.sleep(0.1)
    [row] = found
    return row


def test_feedback_on_an_answer_lands_in_the_inbox_beside_it(server, client):
    completion = client.chat.completions.create(model="tao", messages=CHAT, max_tokens=4)
    answer = post(server, {"response_id": completion.id, "rating": "down", "correction": "5", "comment": "wrong"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "feedback" and body["response_id"] == completion.id and body["id"].startswith("feedback-")

    row = wait_for_row(server, body["id"])
    assert row["feedback"] == {"response_id": completion.id, "choice": 0, "rating": -1.0, "comment": "wrong",
                               "correction": "5"}  # fmt: skip
    assert set(row) == {"id", "feedback", "received_at"}
    [answered] = [r for r in inbox_rows(server) if r["id"] == completion.id]  # the answer it rates, by the same id
    assert answered["response"]["choices"][0]["message"]["content"] == completion.choices[0].message.content


def test_the_openai_clients_own_post_sends_feedback_too(server, client):
    completion = client.completions.create(model="tao", prompt=["one", "two"], max_tokens=2, n=2)
    sent = client.post(
        "/feedback", cast_to=httpx.Response, body={"response_id": completion.id, "choice": 3, "rating": 0.5}
    )
    body = sent.json()
    row = wait_for_row(server, body["id"])
    assert row["feedback"] == {"response_id": completion.id, "choice": 3, "rating": 0.5, "comment": None,
                               "correction": None}  # fmt: skip
    metrics = requests.get(server.root + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    assert 'tao_serve_feedback_total{outcome="logged"}' in metrics


@pytest.mark.parametrize(
    ("body", "key", "status", "words", "param"),
    [
        ({"response_id": SOME_ID, "rating": 7}, KEY, 400, "rating 7 is not 'up', 'down' or a number", "rating"),
        ({"response_id": SOME_ID, "rating": "meh"}, KEY, 400, "rating 'meh' is not 'up', 'down'", "rating"),
        (
            {"response_id": SOME_ID, "rating": 10**400},
            KEY,
            400,
            "is not 'up', 'down' or a number from -1 to 1",
            "rating",
        ),
        ({"rating": "up"}, KEY, 400, "response_id: Field required", "response_id"),
        ({"response_id": SOME_ID, "rating": "up", "comment": "x" * 100_000}, KEY, 400, "comment too long", "comment"),
        ({"response_id": SOME_ID}, KEY, 400, "no rating, comment or correction", None),
        ({"response_id": "resp_123", "rating": "up"}, KEY, 400, "not an id this server returns", "response_id"),
        ({"response_id": "chatcmpl-" + "a" * 300, "rating": "up"}, KEY, 400, "at most 200", "response_id"),
        ({"response_id": SOME_ID, "rating": "up", "choice": -1}, KEY, 400, "choice", "choice"),
        ({"response_id": SOME_ID, "rating": "up", "choice": "2"}, KEY, 400, "choice", "choice"),
        ({"response_id": SOME_ID, "rating": "up"}, None, 401, "bearer key", None),
        ({"response_id": SOME_ID, "rating": "up"}, "wrong-key", 401, "bearer key", None),
    ],
)
def test_bad_feedback_gets_one_clear_line(server, body, key, status, words, param):
    answer = post(server, body, key)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "\n" not in error["message"] and error["param"] == param, error
    assert len(error["message"]) < 300


def test_feedback_beyond_the_body_limit_is_refused_before_it_is_read(server):
    answer = post(server, {"response_id": SOME_ID, "rating": "up", "correction": "x" * (2 * 2**20)})
    assert answer.status_code == 413 and "serve.max_body_bytes" in answer.json()["error"]["message"]


def test_bad_feedback_is_counted_and_never_logged(server):
    post(server, {"response_id": SOME_ID, "rating": 7})
    metrics = requests.get(server.root + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    assert 'tao_serve_feedback_total{outcome="invalid"}' in metrics
    server.app.state.request_log.flush()
    assert not [row for row in inbox_rows(server) if row.get("feedback", {}).get("rating") == 7]


def test_without_request_logging_feedback_has_nowhere_to_go(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TAO_SERVE_API_KEYS", raising=False)  # the module's server set keys for itself
    config = serve_config(tmp_path, tiny_model_dir, "log_requests = false")
    with running_server(load(config)) as running:
        completion = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0).chat.completions.create(
            model="tao", messages=CHAT, max_tokens=2
        )
        answer = post(running, {"response_id": completion.id, "rating": "up"}, key=None)
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "serve.log_requests = false" in message and "\n" not in message
    assert not (running.settings.inbox_dir.exists() and list(running.settings.inbox_dir.iterdir()))

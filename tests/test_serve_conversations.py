"""What `tao serve` logs, seen from a real `openai` client: every answer as an OpenAI request/response pair,
conversations whole, under the very id the client got (whole or streamed), and completions of a list of prompts."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.serve_helpers import jsonl_lines, load, running_server, serve_config

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 2?"},
]
PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    config = serve_config(tmp_path_factory.mktemp("serve"), tiny_model_dir, "max_prompts_per_request = 4")
    with running_server(load(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def rows_of(server, completion_id: str) -> list[dict]:
    """The inbox rows logged under one completion id, in choice order."""
    server.app.state.request_log.flush()
    files = sorted(server.settings.inbox_dir.glob("serve-*.jsonl"))
    rows = [json.loads(line) for path in files for line in jsonl_lines(path)]
    return sorted(
        (row for row in rows if row["id"] == completion_id), key=lambda r: r["response"]["choices"][0]["index"]
    )


def test_a_multi_turn_conversation_is_logged_whole_as_an_openai_pair(server, client):
    completion = client.chat.completions.create(
        model="tao", messages=CONVERSATION, max_tokens=4, temperature=0, seed=7, metadata={"task": "arithmetic"}
    )
    [row] = rows_of(server, completion.id)
    assert row["request"] == {
        "model": "tao",
        "messages": CONVERSATION,  # every turn, as sent: the system message and the earlier exchange too
        "max_tokens": 4,
        "temperature": 0.0,
        "seed": 7,
        "metadata": {"task": "arithmetic"},
    }
    assert row["response"] == completion.model_dump(exclude_none=True) | {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.choices[0].message.content},
                     "finish_reason": completion.choices[0].finish_reason}],
    }  # fmt: skip
    assert row["response"]["object"] == "chat.completion" and row["response"]["model"] == completion.model
    assert row["task"] == "arithmetic" and row["model_version"] == completion.model and row["endpoint"] == "chat"
    assert row["latency_ms"] > 0 and row["received_at"]
    metrics = requests.get(server.root + "/metrics", timeout=5).text
    assert "multi_turn" not in metrics


def test_a_streamed_answer_is_logged_under_the_id_of_its_chunks(server, client):
    chunks = list(
        client.chat.completions.create(
            model="tao", messages=CONVERSATION, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1  # one id for the whole stream
    [row] = rows_of(server, ids.pop())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    [choice] = row["response"]["choices"]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert row["response"]["object"] == "chat.completion"  # the answer as one object, though it went out in chunks
    assert row["response"]["usage"] == chunks[-1].usage.model_dump(exclude_none=True)
    assert row["request"]["messages"] == CONVERSATION and row["request"]["stream"] is True


def test_several_choices_give_a_row_each_under_one_id(server, client):
    completion = client.chat.completions.create(model="tao", messages=CONVERSATION[:2], max_tokens=3, n=3)
    rows = rows_of(server, completion.id)
    assert [row["response"]["choices"][0]["index"] for row in rows] == [0, 1, 2]
    assert [row["response"]["choices"][0]["message"]["content"] for row in rows] == [
        choice.message.content for choice in completion.choices
    ]
    assert all(
        row["request"]["n"] == 3 and row["response"]["usage"] == completion.usage.model_dump(exclude_none=True)
        for row in rows
    )


def test_a_list_of_prompts_is_answered_and_logged_one_row_per_prompt(server, client):
    completion = client.completions.create(model="tao", prompt=PROMPTS, max_tokens=4, temperature=0)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    rows = rows_of(server, completion.id)
    assert [row["request"]["prompt"] for row in rows] == PROMPTS  # each row its own prompt, alone
    assert [row["response"]["choices"][0]["text"] for row in rows] == [choice.text for choice in completion.choices]
    assert all(row["response"]["object"] == "text_completion" and row["endpoint"] == "completions" for row in rows)
    alone = client.completions.create(model="tao", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert alone.choices[0].text == completion.choices[1].text  # in a list or alone, the same answer
    assert completion.usage.prompt_tokens > alone.usage.prompt_tokens


def test_choices_of_a_list_are_numbered_prompt_by_prompt(server, client):
    completion = client.completions.create(model="tao", prompt=PROMPTS[:2], max_tokens=3, n=2)
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]  # prompt p, sample i: p * n + i
    rows = rows_of(server, completion.id)
    assert [row["request"]["prompt"] for row in rows] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]

    chunks = list(client.completions.create(model="tao", prompt=PROMPTS[:2], max_tokens=3, n=2, stream=True))
    [ident] = {chunk.id for chunk in chunks}
    texts = ["", "", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    streamed = rows_of(server, ident)
    assert [row["response"]["choices"][0]["text"] for row in streamed] == texts
    assert [row["request"]["prompt"] for row in streamed] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        (["a", "b", "c", "d", "e"], "at most 4 in one request (serve.max_prompts_per_request)"),
        ([], "prompt"),
        (["fine", ""], "prompt[1]: empty"),
    ],
)
def test_a_bad_list_of_prompts_is_one_clear_400(server, prompt, words):
    answer = requests.post(server.url + "/completions", json={"model": "tao", "prompt": prompt}, timeout=10)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and "\n" not in error["message"] and error["param"].startswith("prompt")

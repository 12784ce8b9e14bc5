"""The LLM log formats teams already have, read by content (tao_pipeline/data/ingest/formats.py).

Every example is built from the published schemas, not guessed: requests are the bodies the official
``openai`` client sends (captured from a mock transport), responses are ``openai.types`` objects
serialised as the API returns them, Batch API lines and Databricks inference-table rows follow the
documented line format and column list, and every row goes through a JSONL round trip as a log file
would hold it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from tao_pipeline.data.ingest.formats import MAX_JSON_STRING_CHARS, RowFormatError, canonical_record
from tao_pipeline.settings import SettingsError, load_settings
from tao_pipeline.settings.sections import DataSettings, LogMapping
from tests.helpers import fuzz_examples

DOCS = Path(__file__).resolve().parent.parent / "docs" / "logs.md"

# --- real objects ---------------------------------------------------------------------------------


def sent_body(endpoint: str, **params: Any) -> dict[str, Any]:
    """The JSON body the official client sends for ``client.chat.completions.create(**params)`` (or completions)."""
    httpx = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    sent: dict[str, Any] = {}

    def reply(request):
        sent.update(json.loads(request.content))
        body = chat_completion("chatcmpl-x", "ok") if endpoint == "chat" else text_completion("cmpl-x", ["ok"])
        return httpx.Response(200, json=body)

    client = OpenAI(
        api_key="k",
        base_url="http://logs.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(reply)),
    )
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    create(**params)
    return sent


def chat_completion(ident: str, *answers: str | None, model: str = "gpt-4o-mini-2024-07-18", **message) -> dict:
    """A Chat Completion as the API returns it (every field the type has, nulls included)."""
    choices = [
        {
            "index": i,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": text, **message},
        }
        for i, text in enumerate(answers)
    ]
    body = {
        "id": ident,
        "object": "chat.completion",
        "created": 1_730_000_000,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }
    return ChatCompletion.model_validate(body).model_dump(mode="json")


def text_completion(ident: str, texts: list[str], model: str = "gpt-3.5-turbo-instruct") -> dict:
    choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i, text in enumerate(texts)]
    body = {"id": ident, "object": "text_completion", "created": 1_730_000_000, "model": model, "choices": choices}
    return Completion.model_validate(body).model_dump(mode="json")


def logged(row: dict[str, Any]) -> dict[str, Any]:
    """The row as a JSONL log file holds it, read back."""
    return json.loads(json.dumps(row) + "\n")


def read(row: dict[str, Any], mapping: LogMapping | None = None) -> dict[str, Any]:
    return canonical_record(logged(row), mapping)


def refused(row: Any, mapping: LogMapping | None = None) -> str:
    with pytest.raises(RowFormatError) as caught:
        canonical_record(row, mapping)
    reason = str(caught.value)
    assert reason and "\n" not in reason and len(reason) < 400, reason
    return reason


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a support bot."},
    {"role": "user", "content": "How do I reset my password?"},
]
CHAT_BODY = sent_body("chat", model="gpt-4o-mini", messages=MESSAGES, metadata={"task": "support"}, temperature=0.2)

# --- the issue's two rows -------------------------------------------------------------------------


def test_the_issues_two_rows_are_read():
    first = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a support bot."},
            {"role": "user", "content": "How do I reset my password?"},
        ],
    }
    second = {
        "request": {"messages": [{"role": "user", "content": "Summarize: the cat sat."}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": "A cat sat."}}]},
    }
    assert read(first) == {"messages": first["messages"], "format": "chat"}
    assert read(second) == {"messages": second["request"]["messages"], "response": "A cat sat.", "format": "pair"}


# --- 1. the own schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "What is 2+2?"},
        {
            "id": 7,
            "prompt": "What is 2+2?",
            "task": "arithmetic",
            "system": "Be brief.",
            "constraints": {"max_words": 5},
        },
        {"id": "a-1", "prompt": "Hi", "source": "app", "user": "u1", "timestamp": "2026-01-01"},  # extras ignored
        {"id": None, "prompt": "", "system": None},  # kept as they are: validation names what is wrong
    ],
)
def test_own_schema_rows_are_unchanged_but_for_key_selection(row):
    wanted = {key: row[key] for key in ("id", "prompt", "system", "task", "constraints") if key in row}
    assert read(row) == {**wanted, "format": "own"}


@pytest.mark.parametrize("row", [{}, {"id": 3}, {"text": "hello", "task": "t"}])
def test_an_own_schema_row_without_a_prompt_comes_back_without_one(row):
    """parse_record then says "missing required field 'prompt'", as before."""
    out = read(row)
    assert "prompt" not in out and "messages" not in out and out["format"] == "own"


def test_a_row_that_is_not_an_object_is_refused():
    assert refused([1, 2]) == "row must be a JSON object, got list"


# --- 2. a Chat Completions request body -----------------------------------------------------------


def test_a_chat_request_body_as_the_client_sends_it():
    assert CHAT_BODY["messages"] == MESSAGES and CHAT_BODY["metadata"] == {"task": "support"}
    assert read(CHAT_BODY) == {"messages": MESSAGES, "task": "support", "format": "chat"}


def test_a_chat_body_logged_with_its_completion_as_response():
    completion = chat_completion("chatcmpl-9a", "Click 'Forgot password'.")
    out = read({**CHAT_BODY, "response": completion})
    assert out == {
        "id": "chatcmpl-9a",
        "messages": MESSAGES,
        "task": "support",
        "response": "Click 'Forgot password'.",
        "response_id": "chatcmpl-9a",
        "model": "gpt-4o-mini-2024-07-18",
        "format": "chat",
    }


def test_a_chat_body_logged_flat_with_choices():
    """Some gateways log the request's messages and the completion's fields side by side."""
    completion = chat_completion("chatcmpl-flat", "Use the reset link.")
    out = read({**CHAT_BODY, **completion})
    assert out["id"] == out["response_id"] == "chatcmpl-flat"
    assert (out["messages"], out["response"], out["model"]) == (MESSAGES, "Use the reset link.", completion["model"])


def test_a_chat_body_whose_response_is_plain_text_or_a_json_string():
    assert read({**CHAT_BODY, "response": "Use the link."})["response"] == "Use the link."
    answer_that_is_json = '{"steps": ["open settings", "reset"]}'
    assert read({**CHAT_BODY, "response": answer_that_is_json})["response"] == answer_that_is_json
    as_string = json.dumps(chat_completion("chatcmpl-s", "Use the link."))
    assert read({**CHAT_BODY, "response": as_string})["response_id"] == "chatcmpl-s"
    assert read({**CHAT_BODY, "response": "{name} is a placeholder"})["response"] == "{name} is a placeholder"
    assert refused(logged({**CHAT_BODY, "response": as_string[:60]})).startswith(
        "field 'response' is a string that is not valid JSON"
    )


def test_content_parts_and_refusals_are_the_answer_text():
    parts = chat_completion("chatcmpl-p", None)
    parts["choices"][0]["message"]["content"] = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert read({**CHAT_BODY, "response": parts})["response"] == "one\ntwo"
    refusal = chat_completion("chatcmpl-r", None, refusal="I can't help with that.")
    assert read({**CHAT_BODY, "response": refusal})["response"] == "I can't help with that."


def test_an_answer_made_of_tool_calls_keeps_the_prompt_without_a_response_text():
    call = {"id": "call_1", "type": "function", "function": {"name": "reset", "arguments": "{}"}}
    completion = chat_completion("chatcmpl-t", None, tool_calls=[call])
    out = read({**CHAT_BODY, "response": completion})
    assert "response" not in out and out["response_id"] == "chatcmpl-t" and out["messages"] == MESSAGES


def test_multimodal_messages_pass_through_unvalidated():
    """Content parts, images and odd roles are conversation.from_messages' to judge, not this reader's."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
            ],
        },
        {"role": "narrator", "content": "?"},
    ]
    assert read({"model": "gpt-4o", "messages": messages})["messages"] == messages


# --- 3. request/response pairs --------------------------------------------------------------------


def test_a_gateway_pair_of_objects():
    completion = chat_completion("chatcmpl-gw", "Use the reset link.")
    out = read({"request": CHAT_BODY, "response": completion, "user": "u-1", "latency": 0.4})
    assert out == {
        "id": "chatcmpl-gw",
        "messages": MESSAGES,
        "response": "Use the reset link.",
        "task": "support",
        "response_id": "chatcmpl-gw",
        "model": "gpt-4o-mini-2024-07-18",
        "format": "pair",
    }


def test_a_gateway_pair_of_json_strings():
    """LiteLLM's spend logs and many proxies keep request and response as JSON text."""
    completion = chat_completion("chatcmpl-str", "Use the reset link.")
    row = {"request_id": "req-42", "request": json.dumps(CHAT_BODY), "response": json.dumps(completion)}
    out = read(row)
    assert (out["id"], out["messages"], out["response"], out["response_id"]) == (
        "req-42",
        MESSAGES,
        "Use the reset link.",
        "chatcmpl-str",
    )


def test_a_pair_id_is_the_rows_then_the_responses():
    completion = chat_completion("chatcmpl-1", "a")
    assert read({"id": "row-1", "request_id": "r", "request": CHAT_BODY, "response": completion})["id"] == "row-1"
    assert read({"request_id": "r", "request": CHAT_BODY, "response": completion})["id"] == "r"
    assert read({"request": CHAT_BODY, "response": completion})["id"] == "chatcmpl-1"
    assert "id" not in read({"request": CHAT_BODY})


def test_a_proxy_pair_with_status_and_body_wrappers():
    completion = chat_completion("chatcmpl-w", "fine")
    row = {
        "request": {"url": "/v1/chat/completions", "body": CHAT_BODY},
        "response": {"status": 200, "body": json.dumps(completion)},
    }
    out = read(row)
    assert (out["messages"], out["response"]) == (MESSAGES, "fine")
    failed = {"request": {"body": CHAT_BODY}, "response": {"status": 429, "body": {"error": {"message": "Rate limit"}}}}
    assert refused(logged(failed)) == "field 'response' failed with status_code 429: Rate limit"


def test_a_completions_request_pair():
    body = sent_body("completions", model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=5)
    assert body["prompt"] == "Say hi"
    out = read({"request": body, "response": text_completion("cmpl-1", ["Hi!"])})
    assert out == {
        "id": "cmpl-1",
        "prompt": "Say hi",
        "response": "Hi!",
        "response_id": "cmpl-1",
        "model": "gpt-3.5-turbo-instruct",
        "format": "pair",
    }


def test_a_list_of_prompts_gives_each_choice_its_own_prompt():
    """OpenAI's rule for a completions request with several prompts: choice i answers prompt i // n."""
    body = sent_body("completions", model="m", prompt=["first", "second"], n=2)
    completion = text_completion("cmpl-2", ["a", "b", "c", "d"])
    for index, prompt in enumerate(["first", "first", "second", "second"]):
        one = {**completion, "choices": [completion["choices"][index]]}
        out = read({"request": body, "response": one})
        assert (out["prompt"], out["response_id"]) == (prompt, "cmpl-2" if index == 0 else f"cmpl-2:{index}")
    assert refused(logged({"request": body})) == "field 'request.prompt' holds 2 prompts; a row takes one"
    assert read({"request": {**body, "prompt": ["only"]}})["prompt"] == "only"
    assert (
        refused(logged({"request": {**body, "prompt": [[1, 2], [3]]}}))
        == "field 'request.prompt' holds token ids, not text"
    )


# --- 4. the OpenAI Batch API ----------------------------------------------------------------------


def test_batch_input_lines():
    chat = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT_BODY}
    assert read(chat) == {"id": "request-1", "messages": MESSAGES, "task": "support", "format": "batch_input"}
    body = sent_body("completions", model="gpt-3.5-turbo-instruct", prompt="Say hi")
    text = {"custom_id": "request-2", "method": "POST", "url": "/v1/completions", "body": body}
    assert read(text) == {"id": "request-2", "prompt": "Say hi", "format": "batch_input"}
    embed = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    assert refused(logged(embed)).startswith("batch input line for '/v1/embeddings': only /v1/chat/completions")


def test_a_batch_output_line_is_a_response_for_its_custom_id():
    completion = chat_completion("chatcmpl-b1", "Use the reset link.")
    line = {
        "id": "batch_req_123",
        "custom_id": "request-1",
        "response": {"status_code": 200, "request_id": "req_abc", "body": completion},
        "error": None,
    }
    assert read(line) == {
        "id": "request-1",
        "response": "Use the reset link.",
        "response_id": "chatcmpl-b1",
        "model": "gpt-4o-mini-2024-07-18",
        "format": "batch_output",
    }


def test_failed_batch_output_lines_are_refused_naming_the_failure():
    error = BatchError(code="batch_expired", message="This request could not be executed before the batch expired.")
    expired = {"id": "batch_req_1", "custom_id": "request-1", "response": None, "error": error.model_dump(mode="json")}
    assert refused(logged(expired)) == (
        "batch request failed: batch_expired: This request could not be executed before the batch expired."
    )
    server = {
        "id": "batch_req_2",
        "custom_id": "request-2",
        "error": None,
        "response": {
            "status_code": 500,
            "request_id": "req_x",
            "body": {"error": {"message": "The server had an error.", "type": "server_error"}},
        },
    }
    assert (
        refused(logged(server)) == "batch request failed with status_code 500: server_error: The server had an error."
    )


# --- 5. Databricks inference tables ---------------------------------------------------------------


def inference_row(**changes: Any) -> dict[str, Any]:
    """A row of a model-serving endpoint's inference table, with the documented columns."""
    request = {"messages": MESSAGES, "max_tokens": 128}
    response = chat_completion("chatcmpl-db1", "Use the reset link.", model="databricks-meta-llama-3-3-70b-instruct")
    row = {
        "client_request_id": None,
        "databricks_request_id": "2f1a0c8e-5b7d-4f5e-9c2a-6d1e3b4a5c6d",
        "date": "2025-03-02",
        "timestamp_ms": 1_740_912_000_000,
        "status_code": 200,
        "execution_time_ms": 812,
        "sampling_fraction": 1.0,
        "request": json.dumps(request),
        "response": json.dumps(response),
        "request_metadata": {"model_name": "support-bot", "endpoint_name": "support-bot", "model_version": "3"},
    }
    return {**row, **changes}


def test_an_inference_table_row():
    assert read(inference_row()) == {
        "id": "2f1a0c8e-5b7d-4f5e-9c2a-6d1e3b4a5c6d",
        "messages": MESSAGES,
        "response": "Use the reset link.",
        "response_id": "chatcmpl-db1",
        "model": "databricks-meta-llama-3-3-70b-instruct",
        "format": "inference_table",
    }


def test_an_inference_table_row_names_the_version_from_request_metadata_when_the_response_does_not():
    response = chat_completion("chatcmpl-db2", "ok")
    del response["model"]
    assert read(inference_row(response=json.dumps(response)))["model"] == "3"


def test_an_inference_table_read_from_parquet_with_its_map_column():
    """Arrow hands a MAP column over as (key, value) pairs; a STRING status_code as text."""
    row = inference_row(status_code="200")
    response = json.loads(row["response"])
    del response["model"]
    row["response"] = json.dumps(response)
    metadata_type = pa.map_(pa.string(), pa.string())
    columns = {key: [value] for key, value in row.items() if key != "request_metadata"}
    table = pa.table(columns).append_column(
        "request_metadata", pa.array([list(row["request_metadata"].items())], type=metadata_type)
    )
    (record,) = table.to_pylist()
    assert isinstance(record["request_metadata"], list)
    out = canonical_record(record)
    assert (out["model"], out["messages"], out["format"]) == ("3", MESSAGES, "inference_table")


def test_failed_or_non_chat_inference_table_rows_are_refused():
    assert refused(logged(inference_row(status_code=500))) == "inference-table call failed with status_code 500"
    classic = inference_row(request=json.dumps({"dataframe_records": [{"x": 1}]}))
    assert refused(logged(classic)) == "field 'request' has no 'messages' or 'prompt'"


# --- 6. tao serve's own logs ----------------------------------------------------------------------


def serve_row(choice_index: int = 0, **changes: Any) -> dict[str, Any]:
    """What `tao serve` logs now: the request and its response with this row's one choice."""
    completion = chat_completion("chatcmpl-serve", "first", "second", model="v0003")
    one = {**completion, "choices": [completion["choices"][choice_index]]}
    row = {
        "id": "chatcmpl-serve",
        "request": CHAT_BODY,
        "response": one,
        "task": "support",
        "model_version": "v0003",
        "latency_ms": 81.5,
        "endpoint": "chat",
        "received_at": "2026-01-01T00:00:00Z",
    }
    return {**row, **changes}


def test_serve_rows_now():
    assert read(serve_row()) == {
        "id": "chatcmpl-serve",
        "messages": MESSAGES,
        "response": "first",
        "task": "support",
        "response_id": "chatcmpl-serve",
        "model": "v0003",
        "format": "pair",
    }
    second = read(serve_row(1))
    assert (second["response"], second["response_id"]) == ("second", "chatcmpl-serve:1")


def test_serve_rows_without_the_answer_text():
    """serve.log_responses = false: the choice keeps its index and finish_reason, the message its role."""
    completion = serve_row()["response"]
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}
    out = read(serve_row(response={**completion, "choices": [choice]}))
    assert "response" not in out and out["response_id"] == "chatcmpl-serve" and out["messages"] == MESSAGES
    completions_choice = {"index": 0, "finish_reason": "stop"}
    assert "response" not in read(serve_row(response={**completion, "choices": [completions_choice]}))


def test_old_serve_rows():
    row = {
        "id": "tao-serve-5d2f",
        "prompt": "How do I reset my password?",
        "system": "You are a support bot.",
        "task": "support",
        "model_version": "v0002",
        "response": "Use the reset link.",
        "finish_reason": "stop",
        "latency_ms": 40.1,
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "endpoint": "chat",
        "received_at": "2025-12-01T00:00:00Z",
    }
    assert read(row) == {
        "id": "tao-serve-5d2f",
        "prompt": "How do I reset my password?",
        "system": "You are a support bot.",
        "task": "support",
        "response": "Use the reset link.",
        "model": "v0002",
        "format": "own",
    }


# --- feedback -------------------------------------------------------------------------------------


def test_a_feedback_only_row_from_serve():
    row = {
        "id": "feedback-9f8e",
        "received_at": "2026-01-01T00:00:00Z",
        "feedback": {
            "response_id": "chatcmpl-serve",
            "choice": 0,
            "rating": "down",
            "comment": "Wrong menu.",
            "correction": "Settings > Security > Reset.",
        },
    }
    assert read(row) == {
        "id": "feedback-9f8e",
        "response_id": "chatcmpl-serve",
        "format": "feedback",
        "feedback": {"rating": "down", "comment": "Wrong menu.", "correction": "Settings > Security > Reset."},
    }
    later_choice = read({**row, "feedback": {**row["feedback"], "choice": 2, "rating": -0.5}})
    assert later_choice["response_id"] == "chatcmpl-serve:2" and later_choice["feedback"] == {
        "rating": -0.5,
        "comment": "Wrong menu.",
        "correction": "Settings > Security > Reset.",
    }


def test_feedback_rows_from_other_apps_and_their_faults():
    out = read({"response_id": "chatcmpl-1", "feedback": {"score": 1}})
    assert (out["response_id"], out["feedback"]) == ("chatcmpl-1", {"rating": 1})
    assert refused(logged({"feedback": {"response_id": 5, "rating": "up"}})) == (
        "field 'feedback.response_id' must be a non-empty string, got int"
    )
    assert refused(logged({"feedback": {"response_id": "c", "choice": -1}})) == (
        "field 'feedback.choice' must be a whole number >= 0, got -1"
    )


def test_the_feedback_api_body_logged_as_it_is():
    body = {"response_id": "chatcmpl-2", "choice": 1, "rating": "down", "comment": "No.", "correction": "Yes."}
    assert read(body) == {
        "response_id": "chatcmpl-2:1",
        "format": "feedback",
        "feedback": {"rating": "down", "comment": "No.", "correction": "Yes."},
    }
    assert read({"id": "f1", "response_id": "cmpl-3", "score": 0.5})["feedback"] == {"rating": 0.5}
    assert refused(logged({"response_id": "c", "choice": "first", "rating": 1})) == (
        "field 'choice' must be a whole number >= 0, got 'first'"
    )
    empty = refused(logged({"response_id": "", "rating": 1}))
    assert empty == "field 'response_id' must be a non-empty string, got str"
    assert read({"prompt": "hi", "response_id": "x", "rating": 1})["format"] == "own"  # a prompt makes it a log row


def test_feedback_carried_on_a_row_with_its_prompt():
    out = read({**serve_row(), "feedback": {"rating": True, "note": "x"}})
    assert out["feedback"] == {"rating": True} and out["messages"] == MESSAGES
    assert refused(logged({"prompt": "hi", "feedback": "up"})) == (
        "field 'feedback' must be a JSON object (rating, comment, correction), got str"
    )


# --- the mapping ----------------------------------------------------------------------------------

APP_ROW = {
    "event": "llm_call",
    "payload": {
        "input": {"messages": MESSAGES},
        "output": json.dumps(chat_completion("chatcmpl-app", "Use the link.")),
    },
    "meta": {"user_rating": "up", "task_name": "support"},
    "trace.id": "trace-77",
}


def test_a_mapping_reads_nested_paths_json_strings_list_indexes_and_dotted_columns():
    mapping = LogMapping(
        messages="payload.input.messages",
        id="trace.id",
        task="meta.task_name",
        response="payload.output.choices.0.message.content",
        rating="meta.user_rating",
        model="payload.output.model",
    )
    assert read(APP_ROW, mapping) == {
        "messages": MESSAGES,
        "id": "trace-77",
        "task": "support",
        "model": "gpt-4o-mini-2024-07-18",
        "response": "Use the link.",
        "feedback": {"rating": "up"},
        "format": "mapping",
    }
    whole = read(APP_ROW, LogMapping(messages="payload.input.messages", response="payload.output"))
    assert (whole["response"], whole["response_id"]) == ("Use the link.", "chatcmpl-app")
    last_user = LogMapping(prompt="payload.input.messages.-1.content", system="payload.input.messages.0.content")
    assert read(APP_ROW, last_user) == {
        "prompt": "How do I reset my password?",
        "system": "You are a support bot.",
        "format": "mapping",
    }


def test_a_mapping_reads_a_json_string_column_of_messages():
    row = {"conversation": json.dumps(MESSAGES), "stars": 4}
    assert read(row, LogMapping(messages="conversation", rating="stars")) == {
        "messages": MESSAGES,
        "feedback": {"rating": 4},
        "format": "mapping",
    }


def test_a_mapping_path_that_points_nowhere_quarantines_the_row():
    mapping = LogMapping(messages="payload.msgs")
    assert refused(logged(APP_ROW), mapping) == "data.mapping.messages: 'payload.msgs' not found in the row"
    assert refused({"payload": {"msgs": None}}, mapping) == "data.mapping.messages: 'payload.msgs' is null in the row"
    both = LogMapping(messages="payload.msgs", prompt="text")
    assert refused(logged(APP_ROW), both) == (
        "data.mapping.messages: 'payload.msgs' not found in the row (nor data.mapping.prompt: 'text')"
    )
    assert read({"text": "hi"}, both) == {"prompt": "hi", "format": "mapping"}


def test_optional_mapped_fields_missing_from_a_row_are_left_out():
    mapping = LogMapping(messages="payload.input.messages", rating="meta.user_rating", comment="meta.comment")
    row = {**APP_ROW, "meta": "n/a"}  # a string on the way that is not JSON points nowhere
    assert read(row, mapping) == {"messages": MESSAGES, "format": "mapping"}
    bad_json = {**APP_ROW, "meta": "{not json"}
    assert refused(logged(bad_json), mapping).startswith(
        "data.mapping.rating (meta) is a string that is not valid JSON"
    )


def test_a_mapping_is_checked_when_settings_load(tmp_path):
    def load(text: str):
        path = tmp_path / "tao.toml"
        path.write_text(text, encoding="utf-8")
        return load_settings(path)

    good = load('[data.mapping]\nmessages = "payload.input.messages"\nrating = "meta.user_rating"\n')
    assert good.data.mapping == LogMapping(messages="payload.input.messages", rating="meta.user_rating")
    assert DataSettings().mapping is None
    cases = [
        (
            '[data.mapping]\nmessages = "payload..messages"\n',
            "setting 'data.mapping.messages': 'payload..messages' has an empty part",
        ),
        ('[data.mapping]\nmessages = ".messages"\n', "setting 'data.mapping.messages': '.messages' has an empty part"),
        ('[data.mapping]\nprompt = ""\n', "setting 'data.mapping.prompt': is empty"),
        ('[data.mapping]\nprompt = " text"\n', "setting 'data.mapping.prompt': ' text' has spaces at its ends"),
        ('[data.mapping]\nid = "request_id"\n', "setting 'data.mapping': data.mapping needs messages or prompt"),
        (
            '[data.mapping]\nmessages = "m"\nratting = "r"\n',
            "setting 'data.mapping.ratting': Extra inputs are not permitted",
        ),
        ('[data.mapping]\nmessages = ["m"]\n', "setting 'data.mapping.messages': Input should be a valid string"),
        ('[data]\nmapping = "payload"\n', "setting 'data.mapping'"),
    ]
    for text, said in cases:
        with pytest.raises(SettingsError) as caught:
            load(text)
        assert said in str(caught.value) and "\n" not in str(caught.value), (text, str(caught.value))


def test_a_mapping_from_overrides():
    settings = load_settings(None, ["data.mapping.prompt=payload.text", "data.mapping.id=0"])
    assert settings.data.mapping == LogMapping(prompt="payload.text", id="0")


# --- bad input next to good input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            {"request": '{"messages": [', "response": None},
            "field 'request' is a string that is not valid JSON: Expecting value at char 14",
        ),
        ({"request": "[1, 2]"}, "field 'request' must be a JSON object, got list"),
        ({"request": {"model": "m"}}, "field 'request' has no 'messages' or 'prompt'"),
        ({"request": {"model": "m", "input": "hi"}}, "field 'request' has 'input' but no 'messages' or 'prompt'"),
        (
            {"request": CHAT_BODY, "response": '{"id": "chatcmpl-1", "choices": [{"mess'},
            "field 'response' is a string that is not valid JSON",
        ),
        (
            {"request": CHAT_BODY, "response": {"id": "c", "choices": {"0": {}}}},
            "field 'response.choices' must be a list, got dict",
        ),
        (
            {"request": CHAT_BODY, "response": {"id": "c", "choices": []}},
            "field 'response.choices' is empty: the response has no answer",
        ),
        (
            {"request": CHAT_BODY, "response": {"id": "c", "choices": ["hi"]}},
            "field 'response.choices[0]' must be a JSON object, got str",
        ),
        (
            {"request": CHAT_BODY, "response": {"id": "c", "choices": [{"index": 0}]}},
            "field 'response.choices[0]' has no 'message' or 'text'",
        ),
        (
            {"request": CHAT_BODY, "response": {"choices": [{"message": {"role": "assistant", "content": None}}]}},
            "field 'response.choices[0].message' has no text: content is null and there are no tool calls",
        ),
        (
            {"request": CHAT_BODY, "response": {"choices": [{"message": "hi"}]}},
            "field 'response.choices[0].message' must be a JSON object, got str",
        ),
        (
            {"request": CHAT_BODY, "response": {"choices": [{"message": {"content": 5}}]}},
            "field 'response.choices[0].message.content' must be a string or a list of parts, got int",
        ),
        (
            {"request": CHAT_BODY, "response": {"choices": [{"text": None}]}},
            "field 'response.choices[0].text' must be a string, got null",
        ),
        (
            {"request": CHAT_BODY, "response": {"choices": [{"index": "1", "text": "x"}]}},
            "field 'response.choices[0].index' must be a whole number >= 0, got '1'",
        ),
        (
            {"request": CHAT_BODY, "response": {"id": ["x"], "choices": [{"text": "x"}]}},
            "field 'response.id' must be a string, got list",
        ),
        (
            {"request": CHAT_BODY, "response": {"error": {"message": "Rate limit reached", "type": "requests"}}},
            "field 'response' is an error: requests: Rate limit reached",
        ),
        ({"request": CHAT_BODY, "response": {"object": "list"}}, "field 'response' has no 'choices'"),
        ({"request": CHAT_BODY, "response": 42}, "field 'response' must be a completion object or text, got int"),
        ({"messages": MESSAGES, "choices": "stop"}, "field 'row.choices' must be a list, got str"),
        ({"request": {"prompt": []}}, "field 'request.prompt' is an empty list"),
        ({"request": "[" * 100_000}, "field 'request' is JSON nested too deeply"),
        ({"request": b"\xff{}"}, "field 'request' is not UTF-8 (byte 0)"),
    ],
)
def test_malformed_rows_of_recognised_formats_are_refused_in_one_line(row, reason):
    assert refused(row).startswith(reason)


def test_a_json_string_over_16_mib_is_refused_before_parsing():
    huge = '{"messages": [' + " " * MAX_JSON_STRING_CHARS + "]}"
    reason = refused({"request": huge})
    assert (
        reason == f"field 'request' is a string of {len(huge)} characters > {MAX_JSON_STRING_CHARS}; refused unparsed"
    )
    assert refused(inference_row(response=huge)).startswith("field 'response' is a string of")
    assert refused({"request": huge.encode()}).startswith("field 'request' is a string of")
    mapped = LogMapping(messages="payload.messages")
    assert refused({"payload": huge}, mapped).startswith("data.mapping.messages (payload) is a string of")
    just_under = '{"messages": [' + " " * (MAX_JSON_STRING_CHARS - 20) + "]}"
    assert canonical_record({"request": just_under})["messages"] == []


# --- never a traceback ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "id",
        "prompt",
        "messages",
        "request",
        "response",
        "choices",
        "custom_id",
        "body",
        "url",
        "error",
        "databricks_request_id",
        "status_code",
        "feedback",
        "response_id",
        "model_version",
        "request_metadata",
        "task",
        "message",
        "content",
        "text",
        "index",
        "n",
        "metadata",
    ]
)
rows = st.recursive(
    st.dictionaries(keys, json_values, max_size=6),
    lambda inner: st.dictionaries(keys, inner | json_values | inner.map(json.dumps), max_size=6),
    max_leaves=12,
)


@settings(max_examples=fuzz_examples(500))
@given(row=rows)
def test_any_row_gives_a_canonical_dict_or_one_line_naming_the_problem(row):
    for mapping in (None, LogMapping(messages="request.messages", response="response", rating="feedback.rating")):
        try:
            out = canonical_record(row, mapping)
        except RowFormatError as error:
            assert str(error) and "\n" not in str(error)
        else:
            assert isinstance(out, dict) and out["format"]
            assert set(out) <= {
                "id",
                "prompt",
                "system",
                "messages",
                "task",
                "constraints",
                "response",
                "response_id",
                "model",
                "feedback",
                "format",
            }


# --- the documentation's examples ----------------------------------------------------------------


def test_every_example_line_in_docs_logs_md_is_read_as_it_says():
    text = DOCS.read_text(encoding="utf-8")
    examples = re.findall(r"```json\n(.*?)```\n+Read as `(\w+)`", text, flags=re.S)
    assert len(examples) >= 8
    for block, kind in examples:
        for line in block.strip().splitlines():
            assert canonical_record(json.loads(line))["format"] == kind, line
    (toml_block,) = re.findall(r"```toml\n(\[data\.mapping\].*?)```", text, flags=re.S)
    mapping = LogMapping.model_validate(tomllib.loads(toml_block)["data"]["mapping"])
    (row,) = re.findall(r"For this row:\n\n```jsonl\n(.*?)\n```", text, flags=re.S)
    out = canonical_record(json.loads(row), mapping)
    assert (out["id"], out["task"], out["response"], out["feedback"]) == (
        "trace-77",
        "support",
        "Open Settings.",
        {"rating": "up"},
    )


def example_rows() -> list[dict[str, Any]]:
    completion = chat_completion("chatcmpl-m", "a", "b")
    return [
        {**CHAT_BODY, "response": completion},
        {**CHAT_BODY, **completion},
        {"request": json.dumps(CHAT_BODY), "response": json.dumps(completion)},
        serve_row(1),
        {"custom_id": "r", "method": "POST", "url": "/v1/chat/completions", "body": CHAT_BODY},
        {"id": "b", "custom_id": "r", "response": {"status_code": 200, "body": completion}, "error": None},
        inference_row(),
        {"id": "f", "feedback": {"response_id": "chatcmpl-m", "choice": 1, "rating": "up"}},
        {"request": {"prompt": ["x", "y"], "n": 2}, "response": text_completion("cmpl-m", ["p", "q", "r", "s"])},
    ]


def paths_in(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a row (keys and list indexes), JSON strings included as leaves."""
    found = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found += paths_in(inner, (*prefix, key))
    return found


def replaced(row: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(row) if isinstance(row, dict) else list(row)
    copy[path[0]] = replaced(copy[path[0]], path[1:], new)
    return copy


@settings(max_examples=fuzz_examples(800))
@given(data=st.data(), new=json_values)
def test_a_real_row_with_any_one_value_replaced_is_read_or_refused_in_one_line(data, new):
    row = data.draw(st.sampled_from(example_rows()))
    path = data.draw(st.sampled_from(paths_in(row)))
    mutated = replaced(row, path, data.draw(st.sampled_from([new, json.dumps(new), None])))
    try:
        out = canonical_record(mutated)
    except RowFormatError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert out["format"]

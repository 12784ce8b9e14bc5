"""The LLM log formats teams already have, recognised by content: one row -> the project's canonical dict.

A row is read as the first of these that it matches (no settings needed):

* **own schema**: ``prompt`` is a string (or nothing below matches): ``id``, ``prompt``, ``system``,
  ``task``, ``constraints`` exactly as they are; an old ``tao serve`` row adds ``response`` (its
  text) and ``model_version``;
* **feedback only**: a ``feedback`` object naming the ``response_id`` it is about (what ``tao
  serve``'s ``POST /v1/feedback`` logs), or the body that endpoint takes (``response_id`` beside
  ``rating``, ``score``, ``comment`` or ``correction``), and no prompt;
* **OpenAI Batch API** lines: input ``{"custom_id", "method", "url", "body"}``; output ``{"id",
  "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` (a response only);
* **Databricks inference tables**: ``databricks_request_id``, ``status_code``, ``request`` and
  ``response`` (JSON strings), ``request_metadata``;
* **request/response pairs**: ``request`` and ``response``, each an object or a JSON string, as
  gateways and proxies log them (and ``tao serve`` now does);
* **a Chat Completions request body**: ``messages`` at the top level, optionally with the answer
  as a ``response`` object or a flat ``choices`` list.

With ``data.mapping`` set, every row is read through the mapping instead (:func:`mapped_record`).

The canonical dict (every key optional; a key is present only when the row has it):

* ``id``: the row's external id; ``prompt`` (+ ``system``) or ``messages`` (OpenAI chat messages,
  passed through unvalidated: :func:`tao_pipeline.data.conversation.from_messages` checks them);
* ``task``, ``constraints``: from the row's top level; ``task`` also from a request's
  ``metadata.task``, as ``tao serve`` reads it;
* ``response``: the text of the response's first choice; ``response_id``: the response's ``id``
  (``":<index>"`` added when that choice's index is not 0); ``model``: the version that answered;
* ``feedback``: ``{"rating", "comment", "correction"}`` (those present, uninterpreted);
* ``format``: which of the formats above the row was read as (always present): ``own``, ``chat``,
  ``pair``, ``batch_input``, ``batch_output``, ``inference_table``, ``feedback`` or ``mapping``.

A ``batch_output`` row is a response only (``id`` is its ``custom_id``, joined to the input line
with the same one); a ``feedback`` row is ``id``, ``response_id`` and ``feedback`` only. Neither
has a prompt or messages.

A row of a recognised format that is malformed raises :class:`RowFormatError` with one line
naming the problem. The work is bounded: a JSON string is parsed only up to
:data:`MAX_JSON_STRING_CHARS`, and nesting past Python's recursion limit is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tao_pipeline.settings.sections import LogMapping

MAX_JSON_STRING_CHARS = 16 * 2**20  # a JSON string inside a row (a request, a response) is refused unparsed beyond this
_SHOWN_CHARS = 160  # of a value or an error message quoted in a reason
_INDEX = re.compile(r"-?\d+")
_BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_PROMPT_KEYS = ("prompt", "messages", "request", "body", "custom_id", "databricks_request_id")
_FEEDBACK_FIELDS = ("rating", "comment", "correction")

OWN = "own"
CHAT = "chat"
PAIR = "pair"
BATCH_INPUT = "batch_input"
BATCH_OUTPUT = "batch_output"
INFERENCE_TABLE = "inference_table"
FEEDBACK = "feedback"
MAPPED = "mapping"


class RowFormatError(ValueError):
    """Why a row of a recognised format cannot be read (one line, naming the field)."""


def canonical_record(record: dict[str, Any], mapping: LogMapping | None = None) -> dict[str, Any]:
    """One decoded row of any supported format (or read through ``mapping``) as the canonical dict."""
    if not isinstance(record, dict):
        raise RowFormatError(f"row must be a JSON object, got {type(record).__name__}")
    if mapping is not None:
        return mapped_record(record, mapping)
    if isinstance(record.get("prompt"), str):
        return _own(record)
    if _is_feedback_only(record):
        return _feedback_only(record)
    if "custom_id" in record and any(key in record for key in ("body", "url", "method")):
        return _batch_input(record)
    if "custom_id" in record and ("response" in record or "error" in record):
        return _batch_output(record)
    if "databricks_request_id" in record:
        return _inference_table(record)
    if "request" in record:
        return _pair(record)
    completions_list = isinstance(record.get("prompt"), list) and ("choices" in record or "model" in record)
    if "messages" in record or completions_list:  # a bare list as prompt is the own schema's wrong type
        return _chat(record)
    return _own(record)


# --- the formats ------------------------------------------------------------------------------


def _own(record: dict[str, Any]) -> dict[str, Any]:
    """The project's own row, unchanged but for key selection; an old ``tao serve`` row's answer too."""
    out = {key: record[key] for key in ("id", "prompt", "system", "task", "constraints") if key in record}
    if "response" in record:
        out.update(_answer(record["response"], "response", text=True)[0])
    elif isinstance(record.get("choices"), list):  # a completions log kept flat: prompt and choices side by side
        out.update(_completion(record, "row")[0])
    return _finish(out, record, OWN)


def _chat(record: dict[str, Any]) -> dict[str, Any]:
    """A Chat Completions (or completions) request body, with its answer as ``response`` or flat ``choices``."""
    if record.get("response") is not None:
        answer, index = _answer(record["response"], "response", text=True)
    elif "choices" in record:  # messages and choices logged flat: the row is also the completion
        answer, index = _completion(record, "row")
    else:
        answer, index = {}, None
    out = {**_row_id(record), **_prompt_of(record, "row", index), **answer}
    return _finish(_with_completion_id(out, answer), record, CHAT, record)


def _pair(record: dict[str, Any]) -> dict[str, Any]:
    """A gateway's request/response pair (LiteLLM, Helicone, Portkey-like, and ``tao serve``'s own logs)."""
    request = _json_object(record["request"], "request")
    answer, index = _answer(record.get("response"), "response", text=True, strict_json=True)
    out = {**_row_id(record), **_prompt_of(request, "request", index), **answer}
    return _finish(_with_completion_id(out, answer), record, PAIR, request)


def _batch_input(record: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Batch API input line: ``custom_id``, ``method``, ``url`` and the request ``body``."""
    url = record.get("url")
    if url is not None and url not in _BATCH_ENDPOINTS:
        raise RowFormatError(
            f"batch input line for {_shown(url)}: only {' and '.join(_BATCH_ENDPOINTS)} requests carry a prompt"
        )
    body = _json_object(record.get("body"), "body")
    out = {"id": record["custom_id"], **_prompt_of(body, "body")}
    return _finish(out, record, BATCH_INPUT, body)


def _batch_output(record: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Batch API output (or error file) line: the answer to the input line with the same custom_id."""
    error = record.get("error")
    if error is not None:
        raise RowFormatError(f"batch request failed: {_error_text(error)}")
    response = record.get("response")
    if not isinstance(response, dict):
        raise RowFormatError(f"batch output line: field 'response' must be a JSON object, got {_type(response)}")
    status = response.get("status_code")
    if _status(status) != 200:
        raise RowFormatError(f"batch request failed with status_code {_shown(status)}{_body_error(response)}")
    body = _json_object(response.get("body"), "response.body")
    out = {"id": record["custom_id"], **_completion(body, "response.body")[0]}
    return _finish(out, record, BATCH_OUTPUT)


def _inference_table(record: dict[str, Any]) -> dict[str, Any]:
    """A row of a Databricks inference table (a model-serving endpoint's payload table)."""
    status = record.get("status_code")
    if _status(status) != 200:
        raise RowFormatError(f"inference-table call failed with status_code {_shown(status)}")
    request = _json_object(record.get("request"), "request")
    answer, index = _answer(record.get("response"), "response")
    out = {"id": record["databricks_request_id"], **_prompt_of(request, "request", index), **answer}
    if "model" not in out:
        version = _metadata(record.get("request_metadata")).get("model_version")
        if version is not None:
            out["model"] = str(version)
    return _finish(out, record, INFERENCE_TABLE, request)


def _is_feedback_only(record: dict[str, Any]) -> bool:
    if any(key in record for key in _PROMPT_KEYS):
        return False
    feedback = record.get("feedback")
    return (isinstance(feedback, dict) and "response_id" in feedback) or (
        "response_id" in record and ("feedback" in record or _has_flat_feedback(record))
    )


def _has_flat_feedback(record: dict[str, Any]) -> bool:
    """The body ``POST /v1/feedback`` takes, logged as it is: the rating beside the ``response_id``."""
    return any(key in record for key in (*_FEEDBACK_FIELDS, "score"))


def _feedback_only(record: dict[str, Any]) -> dict[str, Any]:
    """Feedback on an earlier answer (``tao serve``'s ``POST /v1/feedback``): no prompt, the answer's id."""
    if "feedback" not in record:
        flat = {key: record[key] for key in (*_FEEDBACK_FIELDS, "score") if key in record}
        record = {**{key: value for key, value in record.items() if key not in flat}, "feedback": flat}
    feedback = record["feedback"]
    where = "feedback.response_id" if isinstance(feedback, dict) and "response_id" in feedback else "response_id"
    source = feedback if where.startswith("feedback.") else record
    response_id = source.get("response_id")
    if not isinstance(response_id, str) or not response_id.strip():
        raise RowFormatError(f"{_name(where)} must be a non-empty string, got {_type(response_id)}")
    choice = source.get("choice", source.get("index"))
    if choice is not None and (not isinstance(choice, int) or isinstance(choice, bool) or choice < 0):
        where = "feedback.choice" if source is feedback else "choice"
        raise RowFormatError(f"{_name(where)} must be a whole number >= 0, got {_shown(choice)}")
    out: dict[str, Any] = {key: record[key] for key in ("id",) if key in record}
    out["response_id"] = response_id if not choice else f"{response_id}:{choice}"
    return _finish(out, record, FEEDBACK)


# --- parts shared by the formats --------------------------------------------------------------


def _finish(
    out: dict[str, Any], record: dict[str, Any], kind: str, request: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Add what any format may carry at its top level (task, constraints, the serving version, feedback),
    and the task a ``request`` names in ``metadata.task``, as ``tao serve`` reads it, unless the row names one."""
    for key in ("task", "constraints"):
        if key in record and key not in out:
            out[key] = record[key]
    metadata = request.get("metadata") if request is not None else None
    if "task" not in out and isinstance(metadata, dict) and metadata.get("task") is not None:
        out["task"] = metadata["task"]
    version = record.get("model_version")
    if isinstance(version, str) and version:  # tao serve: the registry's version that answered
        out["model"] = version
    if record.get("live_arm") is not None:  # tao serve during a live experiment (validated with the row)
        live = ("live_arm", "live_pair", "latency_ms", "received_at")
        out.update({key: record[key] for key in live if key in record})
    feedback = record.get("feedback")
    if feedback is not None:
        if not isinstance(feedback, dict):
            raise RowFormatError(
                f"field 'feedback' must be a JSON object (rating, comment, correction), got {_type(feedback)}"
            )
        out["feedback"] = _feedback_fields(feedback)
    out.pop("_completion_id", None)
    out["format"] = kind
    return out


def _feedback_fields(feedback: dict[str, Any]) -> dict[str, Any]:
    fields = {key: feedback[key] for key in _FEEDBACK_FIELDS if feedback.get(key) is not None}
    if "rating" not in fields and feedback.get("score") is not None:
        fields["rating"] = feedback["score"]
    return fields


def _row_id(record: dict[str, Any]) -> dict[str, Any]:
    for key in ("id", "request_id"):
        if record.get(key) is not None:
            return {"id": record[key]}
    return {}


def _with_completion_id(out: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A pair without an id of its own takes the completion's (``response_id`` less a later choice's ``:<index>``)."""
    if "id" not in out and "_completion_id" in answer:
        out["id"] = answer["_completion_id"]
    return out


def _prompt_of(body: dict[str, Any], where: str, index: int | None = None, unwrap: bool = True) -> dict[str, Any]:
    """A request body's prompt: chat ``messages`` (unvalidated), or a completions request's ``prompt``.

    ``index`` is the answer's choice index: with a list of prompts, choice ``i`` answers prompt ``i // n``.
    """
    if "messages" in body:
        return {"messages": _json_list(body["messages"], f"{where}.messages")}
    if "prompt" in body:
        return {"prompt": _one_prompt(body["prompt"], f"{where}.prompt", index, body.get("n"))}
    if unwrap and isinstance(body.get("body"), (dict, str, bytes)):  # a proxy's {"url", "headers", "body"}
        return _prompt_of(_json_object(body["body"], f"{where}.body"), f"{where}.body", index, unwrap=False)
    if "input" in body:
        raise RowFormatError(
            f"{_name(where)} has 'input' but no 'messages' or 'prompt': a Responses API or embeddings request "
            "(set data.mapping to read it)"
        )
    raise RowFormatError(f"{_name(where)} has no 'messages' or 'prompt'")


def _one_prompt(prompt: Any, where: str, index: int | None, n: Any) -> Any:
    """A completions request's prompt: a string, or the one of a list that the logged choice answers."""
    if not isinstance(prompt, list):
        return prompt  # a string, or a wrong type that validation names
    if not prompt:
        raise RowFormatError(f"{_name(where)} is an empty list")
    if all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in prompt):
        raise RowFormatError(f"{_name(where)} holds token ids, not text")
    if len(prompt) == 1:
        return prompt[0]
    per_prompt = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    if index is None or index // per_prompt >= len(prompt):
        answered = "" if index is None else f" and choice {index} (n={per_prompt}) answers none of them"
        raise RowFormatError(f"{_name(where)} holds {len(prompt)} prompts{answered}; a row takes one")
    return prompt[index // per_prompt]


def _answer(
    value: Any, where: str, *, text: bool = False, strict_json: bool = False
) -> tuple[dict[str, Any], int | None]:
    """A logged answer, and its choice index: a completion (object or JSON string), or with ``text`` plain text.

    A string that starts like a JSON object is a completion when it parses as one; with ``strict_json``
    (a request/response pair) it must be one, and without it one that does not parse is refused only
    when it looks like a completion cut short (it mentions ``"choices"``): otherwise it is the answer
    text, as an answer that is itself JSON may be.
    """
    if value is None:
        return {}, None
    if isinstance(value, (bytes, bytearray)):
        value = _decoded(value, where)
    if isinstance(value, str):
        if not text:
            return _completion(_json_object(value, where), where)
        if value.lstrip().startswith("{"):  # a completion kept as a JSON string, or an answer that is JSON
            _check_size(value, where, "characters")
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):
                if strict_json or '"choices"' in value:  # a completion cut short: malformed, not an answer
                    _json_object(value, where)  # raises, naming the fault
                parsed = None
            if isinstance(parsed, dict) and (strict_json or "choices" in parsed or "error" in parsed):
                return _completion(parsed, where)
        return {"response": value}, None
    if isinstance(value, dict):
        return _completion(value, where)
    raise RowFormatError(f"{_name(where)} must be a completion object or text, got {_type(value)}")


def _completion(body: dict[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
    """A chat completion's (or completion's) first choice: its text, the response id and the model; and its index.

    An answer whose text was left out when it was logged (``tao serve`` with ``serve.log_responses =
    false``) or that holds only tool calls gives no ``response``, but its id and model all the same.
    """
    if "choices" not in body and isinstance(body.get("body"), (dict, str, bytes)):  # {"status_code", "body"}
        status = _status(body.get("status_code", body.get("status")))
        if status is not None and status != 200:
            raise RowFormatError(f"{_name(where)} failed with status_code {status}{_body_error(body)}")
        body, where = _json_object(body["body"], f"{where}.body"), f"{where}.body"
    if "choices" not in body:
        if body.get("error") is not None:
            raise RowFormatError(f"{_name(where)} is an error: {_error_text(body['error'])}")
        raise RowFormatError(f"{_name(where)} has no 'choices'")
    choices = body["choices"]
    if not isinstance(choices, list):
        raise RowFormatError(f"{_name(where + '.choices')} must be a list, got {_type(choices)}")
    if not choices:
        raise RowFormatError(f"{_name(where + '.choices')} is empty: the response has no answer")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise RowFormatError(f"{_name(where + '.choices[0]')} must be a JSON object, got {_type(choice)}")
    index = choice.get("index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise RowFormatError(f"{_name(where + '.choices[0].index')} must be a whole number >= 0, got {_shown(index)}")
    text = _choice_text(choice, f"{where}.choices[0]")
    out: dict[str, Any] = {} if text is None else {"response": text}
    response_id = body.get("id")
    if response_id is not None:
        if not isinstance(response_id, (str, int)) or isinstance(response_id, bool):
            raise RowFormatError(f"{_name(where + '.id')} must be a string, got {_type(response_id)}")
        out["response_id"] = f"{response_id}:{index}" if index else str(response_id)
        out["_completion_id"] = str(response_id)
    if isinstance(body.get("model"), str) and body["model"]:
        out["model"] = body["model"]
    return out, index


def _choice_text(choice: dict[str, Any], where: str) -> str | None:
    """A chat choice's message content (text parts joined by newlines, else its refusal), or a completion's text.

    None when the text was left out of the log (no ``content``/``text`` key) or the message holds only
    tool calls; a choice with nothing to show for itself is malformed.
    """
    if "message" in choice:
        message = choice["message"]
        if not isinstance(message, dict):
            raise RowFormatError(f"{_name(where + '.message')} must be a JSON object, got {_type(message)}")
        content = message.get("content")
        if isinstance(content, list):
            texts = [text for text in map(_part_text, content) if text is not None]
            content = "\n".join(texts) if texts else None
        if content is None and isinstance(message.get("refusal"), str):
            return message["refusal"]
        if isinstance(content, str):
            return content
        if content is not None:
            raise RowFormatError(
                f"{_name(where + '.message.content')} must be a string or a list of parts, got {_type(content)}"
            )
        if "content" not in message or message.get("tool_calls") or message.get("function_call"):
            return None  # left out of the log, or an answer made of tool calls: no text to learn from
        raise RowFormatError(f"{_name(where + '.message')} has no text: content is null and there are no tool calls")
    if "text" in choice:
        if not isinstance(choice["text"], str):
            raise RowFormatError(f"{_name(where + '.text')} must be a string, got {_type(choice['text'])}")
        return choice["text"]
    if "finish_reason" in choice:  # a completions choice whose text was left out of the log
        return None
    raise RowFormatError(f"{_name(where)} has no 'message' or 'text'")


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") in ("text", "output_text") and isinstance(part.get("text"), str):
        return part["text"]
    if isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    return None


def _status(value: Any) -> int | None:
    """An HTTP status as logged: an integer, or its digits as a string (CSV, a STRING column)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _metadata(value: Any) -> dict[str, Any]:
    """A MAP column as read: a dict, a list of (key, value) pairs (Parquet via Arrow), or a JSON string."""
    if isinstance(value, (str, bytes, bytearray)):
        try:
            value = _json_object(value, "request_metadata")
        except RowFormatError:
            return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        pairs = {}
        for item in value:
            if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
                pairs[item[0]] = item[1]
            elif isinstance(item, dict) and isinstance(item.get("key"), str):
                pairs[item["key"]] = item.get("value")
        return pairs
    return {}


def _error_text(error: Any) -> str:
    """A logged error object ({"code", "message"}) or string, as a short single line."""
    if isinstance(error, dict):
        parts = [str(error[key]) for key in ("code", "type", "message") if error.get(key) is not None]
        return _one_line(": ".join(dict.fromkeys(parts))) or "no details"
    return _one_line(str(error))


def _body_error(response: dict[str, Any]) -> str:
    body = response.get("body")
    if isinstance(body, dict) and body.get("error") is not None:
        return f": {_error_text(body['error'])}"
    return ""


# --- JSON strings and paths -------------------------------------------------------------------


def _decoded(raw: bytes | bytearray, where: str) -> str:
    _check_size(raw, where, "bytes")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowFormatError(f"{_name(where)} is not UTF-8 (byte {error.start})") from None


def _parsed(value: Any, where: str) -> Any:
    """A JSON string's value (size-bounded, nesting-bounded); anything else as it is."""
    if isinstance(value, (bytes, bytearray)):
        value = _decoded(value, where)
    if not isinstance(value, str):
        return value
    _check_size(value, where, "characters")
    try:
        return json.loads(value)
    except RecursionError:
        raise RowFormatError(f"{_name(where)} is JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, or an integer of > 4300 digits
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        at = f" at char {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise RowFormatError(f"{_name(where)} is a string that is not valid JSON: {_one_line(message)}{at}") from None


def _json_object(value: Any, where: str) -> dict[str, Any]:
    parsed = _parsed(value, where)
    if not isinstance(parsed, dict):
        raise RowFormatError(f"{_name(where)} must be a JSON object, got {_type(parsed)}")
    return parsed


def _json_list(value: Any, where: str) -> Any:
    """Messages as logged: a list (returned unvalidated), or a JSON string of one."""
    return _parsed(value, where) if isinstance(value, (str, bytes, bytearray)) else value


def _check_size(value: str | bytes | bytearray, where: str, unit: str) -> None:
    if len(value) > MAX_JSON_STRING_CHARS:
        raise RowFormatError(
            f"{_name(where)} is a string of {len(value)} {unit} > {MAX_JSON_STRING_CHARS}; refused unparsed"
        )


_MISSING = object()


def mapped_record(record: dict[str, Any], mapping: LogMapping) -> dict[str, Any]:
    """A row read through ``data.mapping``: each field from its column or dotted path.

    The conversation (``messages``, else ``prompt``) must be found; the other fields are optional
    per row (a rating only some rows have), but a JSON string on the way that does not parse, or is
    too long, quarantines the row. A string on the way that does not start like JSON points nowhere.
    """
    if not isinstance(record, dict):
        raise RowFormatError(f"row must be a JSON object, got {type(record).__name__}")
    found = {field: _walk(record, path, field) for field, path in mapping.paths().items()}
    out: dict[str, Any] = {}
    messages, prompt = found.get("messages", _MISSING), found.get("prompt", _MISSING)
    if messages is not _MISSING and messages is not None:
        out["messages"] = _json_list(messages, f"data.mapping.messages ({mapping.messages})")
    elif prompt is not _MISSING and prompt is not None:
        out["prompt"] = prompt
    else:
        field = "messages" if mapping.messages is not None else "prompt"
        path = getattr(mapping, field)
        both = f" (nor data.mapping.prompt: {mapping.prompt!r})" if mapping.messages and mapping.prompt else ""
        said = "is null" if found.get(field) is None else "not found"
        raise RowFormatError(f"data.mapping.{field}: {path!r} {said} in the row{both}")
    for field in ("id", "system", "task", "response_id", "model"):
        value = found.get(field, _MISSING)
        if value is not _MISSING and value is not None:
            out[field] = value
    response = found.get("response", _MISSING)
    if response is not _MISSING and response is not None:
        answer, _ = _answer(response, f"data.mapping.response ({mapping.response})", text=True)
        out.update({key: value for key, value in answer.items() if key not in out and key != "_completion_id"})
    feedback = {field: found[field] for field in _FEEDBACK_FIELDS if found.get(field, _MISSING) not in (_MISSING, None)}
    if feedback:
        out["feedback"] = feedback
    out["format"] = MAPPED
    return out


def _walk(record: dict[str, Any], path: str, field: str) -> Any:
    """The value at ``path`` in the row (``_MISSING`` when it points nowhere); JSON strings on the way are parsed.

    At an object, the longest run of segments that is itself a key wins, so a flattened column named
    ``meta.user_rating`` is found as well as a nested ``meta`` → ``user_rating``.
    """
    segments = path.split(".")
    current: Any = record
    at = 0
    while at < len(segments):
        if isinstance(current, (bytes, bytearray)):
            current = _decoded(current, f"data.mapping.{field} ({'.'.join(segments[:at])})")
        if isinstance(current, str) and current.lstrip().startswith(("{", "[")):  # a JSON column: look inside
            current = _parsed(current, f"data.mapping.{field} ({'.'.join(segments[:at])})")
        if isinstance(current, dict):
            for end in range(len(segments), at, -1):
                key = ".".join(segments[at:end])
                if key in current:
                    current, at = current[key], end
                    break
            else:
                return _MISSING
        elif isinstance(current, (list, tuple)) and _INDEX.fullmatch(segments[at]):
            index = int(segments[at])
            if not -len(current) <= index < len(current):
                return _MISSING
            current, at = current[index], at + 1
        else:
            return _MISSING
    return current


# --- small helpers ----------------------------------------------------------------------------


def _name(where: str) -> str:
    """How a reason names a place: ``field 'request.messages'``, or a mapping's own words."""
    return where if where.startswith("data.mapping.") else f"field {where!r}"


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _shown(value: Any) -> str:
    return _one_line(repr(value))

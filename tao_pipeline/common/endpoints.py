"""Calling OpenAI-compatible endpoints safely: an API key that never shows, a deadline that holds, and
failures recorded in a classified form that holds nothing the server sent.

Shared by the LLM judge and the ``openai`` generation backend.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

T = TypeVar("T")

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# A short, fixed description per status; anything else says only which class of status it is.
STATUS_MESSAGES = {
    400: "bad request",
    401: "unauthorized: check the API key",
    403: "forbidden: check the API key",
    404: "not found: check base_url and the model name",
    408: "request timeout",
    409: "conflict",
    413: "request too large",
    422: "request not accepted",
    429: "rate limited",
    500: "server error",
    501: "not implemented",
    502: "bad gateway",
    503: "server unavailable",
    504: "gateway timeout",
}
KIND_MESSAGES = {
    "timeout": "no complete answer",
    "connection": "could not connect, or the connection dropped",
    "invalid": "the answer is not an OpenAI chat completion",
}


@dataclass(frozen=True)
class EndpointFailure:
    """One failed call, classified: a kind (``http``, ``timeout``, ``connection``, ``invalid``), the HTTP status
    when there is one, and a message from a fixed set.

    It holds no text the server sent: servers echo the Authorization header back in error bodies
    (escaped, encoded, cut short...), and no redaction can know every form. So this, and nothing
    of the body, is what reaches Failed reasons, the lake, metadata, reports and logs.
    """

    kind: str
    status: int | None = None
    timeout_s: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in ("timeout", "connection") or self.status in RETRYABLE_STATUS

    def __str__(self) -> str:
        if self.kind == "http":
            return f"HTTP {self.status} ({status_message(self.status)})"
        if self.kind == "timeout" and self.timeout_s is not None:
            return f"timeout: {KIND_MESSAGES['timeout']} within {self.timeout_s:g}s"
        return f"{self.kind}: {KIND_MESSAGES[self.kind]}"


def status_message(status: int | None) -> str:
    if status in STATUS_MESSAGES:
        return STATUS_MESSAGES[status]
    if status is not None and 400 <= status < 500:
        return "client error"
    if status is not None and 500 <= status < 600:
        return "server error"
    return "unexpected status"


def classify(error: BaseException, timeout_s: float | None = None) -> EndpointFailure:
    """The classified form of an exception from the ``openai`` client (or from reading its answer)."""
    if isinstance(error, (DeadlinePassed, openai.APITimeoutError)):
        return EndpointFailure("timeout", timeout_s=timeout_s)
    if isinstance(error, openai.APIConnectionError):
        return EndpointFailure("connection")
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            return EndpointFailure("http", status)
    return EndpointFailure("invalid")  # a 200 that is not JSON, or JSON that is not a completion


class CallFailed(Exception):
    """A call to an endpoint failed; its message is the classified failure, nothing the server sent."""

    def __init__(self, failure: EndpointFailure):
        super().__init__(str(failure))
        self.failure = failure


class RetryableCallFailed(CallFailed):
    """A failure worth another attempt: a timeout, a dropped connection, 408/409/429/5xx."""


def call_failed(failure: EndpointFailure) -> CallFailed:
    return (RetryableCallFailed if failure.retryable else CallFailed)(failure)


def request_before(deadline: float, timeout_s: float, request: Callable[[], T], abandon: Callable[[], None]) -> T:
    """``request()`` through :func:`call_before`; any failure is raised as a CallFailed (classified), with
    no chained exception that could carry the server's text into a traceback."""
    try:
        return call_before(deadline, request, abandon)
    except Exception as error:  # noqa: BLE001 - every failure is classified; the original is dropped
        failure = classify(error, timeout_s)
    raise call_failed(failure)


def token_count(value: Any) -> int:
    """A token count a server reported, when it is one (a non-negative integer), else 0: a server's usage
    block is not validated by the client and could hold any JSON."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class DeadlinePassed(TimeoutError):
    """The call was abandoned at its deadline (its thread ends when its connection is closed)."""


def retry_before_deadline(attempt: Callable[[float], T], *, timeout_s: float, max_retries: int) -> T:
    """``attempt(deadline)`` up to 1 + ``max_retries`` times, backing off 0.5 s, 1 s, 2 s... (at most 8 s),
    all within ``timeout_s``; a RetryableCallFailed is tried again, and the last one raised when none
    succeeds."""
    deadline = time.monotonic() + timeout_s
    error: CallFailed = RetryableCallFailed(EndpointFailure("timeout", timeout_s=timeout_s))
    for number in range(max_retries + 1):
        pause = min(0.5 * 2 ** (number - 1), 8.0) if number else 0.0
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
        try:
            return attempt(deadline)
        except RetryableCallFailed as failed:
            error = failed
    raise error


def call_before(deadline: float, call: Callable[[], Any], abandon: Callable[[], None]) -> Any:
    """``call()`` in a thread that is abandoned at ``deadline`` (time.monotonic()): ``abandon()`` then
    closes what it reads from, and DeadlinePassed is raised. A server that trickles its answer byte
    by byte cannot hold the caller past the deadline, whatever the client's per-read timeout."""
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["value"] = call()
        except Exception as error:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = error

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0))
    if worker.is_alive():
        abandon()
        raise DeadlinePassed("deadline passed")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class ApiKey:
    """An endpoint's key, read from the environment; it shows up in no repr, str or f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ApiKey('[api key]')"

    __str__ = __repr__


def read_api_key(api_key_env: str | None, setting: str) -> ApiKey | None:
    """The key in environment variable ``api_key_env`` (None when no variable is named); ``setting`` names
    the setting in error messages."""
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env, "").strip()  # a trailing newline from a secrets file is no part of it
    if not key:
        raise ValueError(f"{setting}: environment variable {api_key_env!r} is not set")
    if not key.isprintable() or not key.isascii() or " " in key:
        # The message never shows the value: only that it cannot go in an HTTP header.
        raise ValueError(
            f"{setting}: environment variable {api_key_env!r} holds characters an "
            "API key cannot have (whitespace, control or non-ASCII characters)"
        )
    return ApiKey(key)

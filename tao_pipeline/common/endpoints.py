"""Calling OpenAI-compatible endpoints safely: an API key that never shows, and a deadline that holds.

Shared by the LLM judge and the ``openai`` generation backend.
"""

from __future__ import annotations

import base64
import html
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MIN_REDACTED_FORM = 8  # shorter encoded pieces would redact ordinary words; a real key's forms are longer
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class DeadlinePassed(TimeoutError):
    """The call was abandoned at its deadline (its thread ends when its connection is closed)."""


def retry_before_deadline(
    attempt: Callable[[float], T], *, timeout_s: float, max_retries: int, retryable: type[Exception]
) -> T:
    """``attempt(deadline)`` up to 1 + ``max_retries`` times, backing off 0.5 s, 1 s, 2 s... (at most 8 s),
    all within ``timeout_s``; when none succeeds, the last ``retryable`` error is raised."""
    deadline = time.monotonic() + timeout_s
    error: Exception = retryable("no attempt made")
    for number in range(max_retries + 1):
        pause = min(0.5 * 2 ** (number - 1), 8.0) if number else 0.0
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
        try:
            return attempt(deadline)
        except retryable as failed:
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
    """A judge endpoint's key, read from the environment; it shows up in no repr, str or f-string.

    ``redact`` removes it from text in every form a server might echo it in: as is, JSON-escaped,
    URL-encoded, HTML-escaped, with backslashes doubled, \\u-escaped, in hex, and in base64 (at each
    of the three alignments it can have inside a longer encoded string).
    """

    __slots__ = ("_forms", "_value")

    def __init__(self, value: str):
        self._value = value
        self._forms = sorted(_encoded_forms(value), key=len, reverse=True)  # longest first

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "[api key]")
        return text

    def __repr__(self) -> str:
        return "ApiKey('[api key]')"

    __str__ = __repr__


def _encoded_forms(key: str) -> set[str]:
    raw = key.encode()
    forms = {
        key,
        json.dumps(key)[1:-1],
        json.dumps(key)[1:-1].replace("/", "\\/"),
        urllib.parse.quote(key, safe=""),
        urllib.parse.quote_plus(key),
        html.escape(key),
        key.replace("\\", "\\\\"),
        "".join(f"\\u{ord(char):04x}" for char in key),
        raw.hex(),
        raw.hex().upper(),
    }
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):  # the key's bytes start 0, 1 or 2 bytes into a 3-byte group
            encoded = encode(b"\0" * offset + raw).decode()
            start = (offset * 4 + 2) // 3  # characters that carry the padding bytes
            end = len(encoded) - encoded.count("=") - (1 if (offset + len(raw)) % 3 else 0)
            forms.add(encoded[start:end])
    return {form for form in forms if len(form) >= MIN_REDACTED_FORM}


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

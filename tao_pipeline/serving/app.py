"""The HTTP API: OpenAI's chat and text completions (streaming too), models, feedback, health and Prometheus metrics.

Every response names the version that wrote it (the ``model`` field and the ``X-Tao-Model-Version``
header), and every answered request becomes rows in the inbox, in OpenAI's request/response pair
shape (see ``request_log``): one row per choice, under the completion id the client got, which is
what it sends back to ``POST /v1/feedback`` with a rating, a comment or a correction.

What one request can cost the others is bounded, in this order:

1. ``Gate`` (before anything reads the body): the bearer key, then the body size from its
   ``Content-Length`` (413 before a byte of it is read), then the body itself, read up to
   ``serve.max_body_bytes`` within ``serve.body_timeout_s`` (413 / 408);
2. validation: OpenAI's fields and ranges, text that is valid Unicode, ``serve.max_messages``;
3. admission: at most ``max_batch_rows + max_queued_rows`` rows in flight, else 429 with Retry-After;
4. the engine's own checks on this request alone (the prompt tokenized, prompt + max_tokens within
   the model's context);
5. a deadline (``serve.request_timeout_s``) on the whole request, and a client that leaves is
   cancelled: nothing more is generated for it and its answer, unseen, is not logged.

Every error, from any layer, has OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tao_pipeline.data.feedback import FeedbackRejected, parse_feedback
from tao_pipeline.serving.champion import ChampionWatcher
from tao_pipeline.serving.engine import (
    Completion,
    Delta,
    Engine,
    EngineError,
    GenerationRequest,
    RequestRefused,
    Stream,
)
from tao_pipeline.serving.live import CANARY, CHAMPION, SHADOW, LiveRouter, sticky_key
from tao_pipeline.serving.metrics import ServeMetrics
from tao_pipeline.serving.request_log import RequestLog
from tao_pipeline.settings import ServeSettings

logger = logging.getLogger("tao_pipeline.serve")
VERSION_HEADER = "X-Tao-Model-Version"
OPEN_PATHS = frozenset({"/health"})  # for load balancers; everything else needs the key when keys are set
INT64 = 2**63
MAX_RESPONSE_ID_CHARS = 200
MINTED_ID = re.compile(r"(chatcmpl|cmpl)-[0-9a-f]{32}")  # what new_completion_id gives
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


class ServeError(Exception):
    """An HTTP error in OpenAI's shape, raised anywhere in a request."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **headers):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(
                part["text"]
                for part in self.content
                if part.get("type") == "text" and isinstance(part.get("text"), str)
            )
        return self.content or ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (user, logprobs...) are accepted
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="A 64-bit integer.")
    stop: str | list[str] | None = None
    stream: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16, description="At most 16 pairs, as OpenAI's.")

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        where = _not_unicode(data)
        if where is not None:  # raised through pydantic as it is, to keep the parameter's name
            message = f"{where or 'body'}: not valid Unicode text (a lone surrogate, e.g. \\ud800)"
            raise ServeError(400, message, param=where or None)
        return data

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"metadata[{key[:64]!r}]: keys take at most 64 characters and values 512")
        return metadata


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Sampling):
    prompt: str | list[str]


class FeedbackBody(BaseModel):
    """``POST /v1/feedback``: what a user did with one choice of an answer this API gave."""

    model_config = ConfigDict(extra="ignore")
    response_id: str = Field(description="The ``id`` of the completion, as this API returned it.")
    choice: int = Field(0, ge=0, strict=True, description="The choice's ``index`` in that completion.")
    rating: Any = Field(None, description="'up', 'down' or a number from -1 (bad) to 1 (good).")
    comment: Any = Field(None, description="What the user said about the answer.")
    correction: Any = Field(None, description="The answer the user says it should have been.")

    @field_validator("response_id")
    @classmethod
    def _one_of_ours(cls, value: str) -> str:
        if len(value) > MAX_RESPONSE_ID_CHARS:
            raise ValueError(f"response_id: {len(value)} characters; an id this server returns has at most 200")
        if not MINTED_ID.fullmatch(value):
            raise ValueError(
                f"response_id: {value[:60]!r} is not an id this server returns ('chatcmpl-…' or 'cmpl-…', "
                "the 'id' of a completion)"
            )
        return value


def new_completion_id(chat: bool) -> str:
    """The id of one answer: in its body, in every chunk of its stream, in its log rows, and in feedback on it."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def _not_unicode(value: Any, where: str = "") -> str | None:
    """The place of the first text (or key) holding a lone surrogate, which no UTF-8 encoder accepts; None if none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            if (found := _not_unicode(key, place)) is not None or (found := _not_unicode(item, place)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _not_unicode(item, f"{where}[{i}]")) is not None:
                return found
    return None


@dataclass
class Served:
    """One answered request, as the log and the metrics see it."""

    endpoint: str
    task: str
    requests: list[dict[str, Any]]  # the request as the client sent it (validated), one per prompt
    n: int  # choices per prompt: choice i answers requests[i // n]
    started: float
    unlogged_because: str | None = None  # why this request gives no training row (none yet: every answer is)
    sticky: str = ""  # what a canary's routing sticks to: the user, or the conversation's opening
    arm: str | None = None  # during a live experiment: champion, canary or shadow
    asked: str = ""  # the model the client named: the alias is routed by a live experiment, a version is not


class Admission:
    """Rows in flight (decoding or queued): beyond the limit a request is refused with 429 and Retry-After."""

    def __init__(self, limit: int, batch_rows: int):
        self.limit, self.batch_rows = limit, batch_rows
        self.rows = 0
        self.refused = 0
        self._seconds = 1.0  # recent time per request, for Retry-After

    def enter(self, rows: int) -> None:
        if self.rows + rows > self.limit:
            self.refused += 1
            waiting = max(self.rows - self.batch_rows, 0) + rows
            retry = max(1, min(60, math.ceil(waiting / self.batch_rows * self._seconds)))
            raise ServeError(
                429,
                f"the server is busy ({self.rows} rows in flight, at most {self.limit}): retry after {retry} s",
                code="server_busy",
                **{"Retry-After": str(retry)},
            )
        self.rows += rows

    def leave(self, rows: int, seconds: float | None = None) -> None:
        self.rows -= rows
        if seconds is not None:
            self._seconds = 0.8 * self._seconds + 0.2 * seconds


class Gate:
    """ASGI middleware in front of everything: the key, then the body's size, before the body is parsed."""

    def __init__(self, app, *, api_keys: tuple[str, ...], settings: ServeSettings, version: Callable[[], str]):
        self.app, self.api_keys, self.settings, self.version = app, api_keys, settings, version

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
        except ServeError as error:
            await _error_response(error, self.version())(scope, receive, send)
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # from here on: the client's disconnect

        await self.app(scope, replay, send)

    def _authorize(self, scope) -> None:
        if not self.api_keys or scope["path"] in OPEN_PATHS:
            return
        given = _header(scope, b"authorization")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys):
            raise ServeError(401, "missing or wrong bearer key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared:
            if not declared.isdigit():
                raise ServeError(400, f"Content-Length: {declared[:40]!r} is not a number")
            if int(declared) > limit:
                raise ServeError(413, _too_large(int(declared), limit), code="request_too_large")
        parts, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ServeError(400, "the client left before sending the whole body")
                    size += len(message.get("body", b""))
                    if size > limit:
                        raise ServeError(413, _too_large(size, limit, more=True), code="request_too_large")
                    parts.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            raise ServeError(
                408, f"the request body did not arrive within serve.body_timeout_s ({self.settings.body_timeout_s} s)"
            ) from None


def _too_large(size: int, limit: int, more: bool = False) -> str:
    size_text = f"over {size}" if more else str(size)
    return f"the request body is {size_text} bytes; this server takes at most {limit} (serve.max_body_bytes)"


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""


def build_app(
    engine: Engine,
    watcher: ChampionWatcher,
    settings: ServeSettings,
    request_log: RequestLog | None,
    api_keys: tuple[str, ...] = (),
    live: LiveRouter | None = None,
) -> FastAPI:
    metrics = ServeMetrics(request_log, engine)
    admission = Admission(settings.max_batch_rows + settings.max_queued_rows, settings.max_batch_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher.on_swap = metrics.swapped
        if request_log is not None:
            request_log.start()
        await watcher.start(engine)
        if live is not None:
            await live.start()
        try:
            yield
        finally:
            await watcher.stop()
            if live is not None:
                await live.stop()
            await engine.close()
            if request_log is not None:
                request_log.close()

    app = FastAPI(title="tao serve", lifespan=lifespan)
    app.state.metrics, app.state.request_log, app.state.admission = metrics, request_log, admission
    app.state.watcher, app.state.engine, app.state.live = watcher, engine, live
    app.add_middleware(Gate, api_keys=api_keys, settings=settings, version=lambda: engine.version)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return _error_response(error, engine.version)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(ServeError(error.status_code, str(error.detail)), engine.version)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        if request.url.path == "/v1/feedback":
            metrics.feedback("invalid")
        first = error.errors()[0]
        where = _param(first.get("loc", ()))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        elif where and not message.startswith(where):
            message = f"{where}: {message}"
        return _error_response(ServeError(400, message, param=where or None), engine.version)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        ident = uuid.uuid4().hex[:12]
        logger.error("tao serve: internal error %s", ident, exc_info=error)
        return _error_response(ServeError(500, f"internal error {ident} (details in the server's log)"), engine.version)

    @app.get("/health")
    async def health() -> JSONResponse:
        engine_status = engine.status()
        log_status = request_log.health.as_dict() if request_log is not None else None
        healthy = watcher.ready and engine_status.get("healthy", True)
        status = "starting" if not watcher.ready else "unavailable" if not healthy else "ok"
        if healthy and log_status is not None and log_status["status"] != "ok":
            status = "degraded"  # answers still come; their rows wait or were lost: see request_log
        body = {
            "status": status,
            "model_version": engine.version,
            "engine": engine.name,
            **watcher.status(),
            "engine_status": engine_status,
            "rows_in_flight": admission.rows,
            "request_log": log_status,
            "live": live.status() if live is not None else None,
        }
        return JSONResponse(body, status_code=200 if healthy else 503, headers={VERSION_HEADER: engine.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(admission.rows), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        now = int(time.time())
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "tao", "root": engine.version}
            for name in (settings.model_alias, engine.version)
        ]
        if live is not None and live.challenger is not None and live.experiment is not None:
            data.append(
                {"id": live.experiment.version_id, "object": "model", "created": now, "owned_by": "tao",
                 "root": live.experiment.version_id}
            )  # fmt: skip
        return JSONResponse({"object": "list", "data": data}, headers={VERSION_HEADER: engine.version})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, http: Request) -> Response:
        _check_model(body.model, watcher, settings.model_alias, live)
        if len(body.messages) > settings.max_messages:
            raise ServeError(400, f"messages: at most {settings.max_messages} (serve.max_messages)", "messages")
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        if not any(m["role"] == "user" for m in messages):
            raise ServeError(400, "messages: at least one message with role 'user' is needed", "messages")
        request = _generation_request(body, settings, messages=messages, max_tokens=body.max_completion_tokens)
        # The whole conversation is logged, as sent: ingestion keeps its system message and earlier turns.
        logged = body.model_dump(mode="json", exclude_unset=True)
        served = Served("chat", _task(body, settings), [logged], body.n, time.perf_counter())
        served.sticky, served.asked = sticky_key(_user(body), messages, None), body.model
        return await answer([request], served, body.stream, True, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Response:
        _check_model(body.model, watcher, settings.model_alias, live)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ServeError(400, "prompt: give a non-empty string or a list of them", "prompt")
        if len(prompts) > settings.max_prompts_per_request:
            limit = settings.max_prompts_per_request
            raise ServeError(
                400, f"prompt: {len(prompts)} prompts; at most {limit} in one request (serve.max_prompts_per_request)",
                "prompt",
            )  # fmt: skip
        for i, prompt in enumerate(prompts):
            if not prompt:
                where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
                raise ServeError(400, f"{where}: empty; give a non-empty string", where)
        if len(prompts) * body.n > admission.limit:
            raise ServeError(
                400,
                f"prompt: {len(prompts)} prompts x n={body.n} are {len(prompts) * body.n} rows; this server holds at "
                f"most {admission.limit} at once (serve.max_batch_rows + serve.max_queued_rows)",
                "prompt",
            )
        first = _generation_request(body, settings, prompt=prompts[0])
        requests = [dataclasses.replace(first, prompt=prompt) for prompt in prompts]
        logged = body.model_dump(mode="json", exclude_unset=True)
        each = [{**logged, "prompt": prompt} for prompt in prompts]  # a row holds its own prompt alone
        served = Served("completions", _task(body, settings), each, body.n, time.perf_counter())
        served.sticky, served.asked = sticky_key(_user(body), None, prompts[0]), body.model
        return await answer(requests, served, body.stream, False, http)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody) -> JSONResponse:
        """A rating, a comment or a correction of one choice of an answer this API gave (its ``id``).

        The feedback goes into the inbox as a row of its own, beside the answer's rows. Whether
        ``response_id`` names an answer that was really given is not checked here: this server may
        have restarted since, or be one of several replicas writing into one inbox; ingestion joins
        feedback to its answer, and keeps one whose answer it never sees apart.
        """
        limit = min(16, settings.max_batch_rows) * settings.max_prompts_per_request
        if body.choice >= limit:
            metrics.feedback("invalid")
            raise ServeError(400, f"choice: {body.choice}; no answer of this server has more than {limit}", "choice")
        try:
            parsed = parse_feedback({"rating": body.rating, "comment": body.comment, "correction": body.correction})
        except (FeedbackRejected, OverflowError) as error:  # OverflowError: a whole number past any float (10**400)
            metrics.feedback("invalid")
            message = str(error) if isinstance(error, FeedbackRejected) else "rating: not a number from -1 to 1"
            fields = ("rating", "comment", "correction")
            param = next((field for field in fields if message.startswith((field, f"feedback {field}"))), None)
            raise ServeError(400, message, param) from None
        if request_log is None:
            metrics.feedback("not_kept")
            raise ServeError(
                503, "feedback is not kept: this server logs nothing (serve.log_requests = false)", code="not_kept"
            )
        ident = f"feedback-{uuid.uuid4().hex}"
        row = {
            "id": ident,
            "feedback": {
                "response_id": body.response_id,
                "choice": body.choice,
                "rating": parsed.rating,
                "comment": parsed.comment,
                "correction": parsed.correction,
            },
            "received_at": _iso_now(),
        }
        if not request_log.write(row):
            metrics.feedback("not_kept")
            raise ServeError(
                503, "the feedback could not be written into the inbox (see /health); try again", code="not_kept",
                **{"Retry-After": "5"},
            )  # fmt: skip
        metrics.feedback("logged")
        body_out = {"id": ident, "object": "feedback", "response_id": body.response_id}
        return JSONResponse(body_out, headers={VERSION_HEADER: engine.version})

    async def answer(
        requests: list[GenerationRequest], served: Served, stream: bool, chat: bool, http: Request
    ) -> Response:
        if not watcher.ready:
            raise ServeError(503, f"no model loaded yet: {watcher.last_error}", code="unavailable")
        answering, served.arm = route(served)
        rows = sum(request.n for request in requests)
        try:
            admission.enter(rows)
        except ServeError:
            metrics.busy(served.endpoint)
            raise
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        requests = [dataclasses.replace(request, deadline=deadline) for request in requests]
        release = _once(lambda seconds=None: admission.leave(rows, seconds))
        ident, created = new_completion_id(chat), int(time.time())  # one id for the body, every chunk and the log
        shadow_requests = requests if served.arm is not None and live.shadowing else None
        try:
            async with asyncio.timeout_at(deadline):
                started = await _start(answering, requests)
        except BaseException as error:
            release()
            if isinstance(error, Exception):
                failed(served, error)
                raise _as_serve_error(error, settings) from None
            raise
        if stream:

            def done() -> None:
                body = _completion_body(started.completion, chat, ident, created)
                finished(served, body)
                if shadow_requests is not None:
                    _background(shadow(shadow_requests, served, body, chat))

            events = _sse(started, chat, ident, created, served, deadline, settings, metrics, done, failed)
            headers = {VERSION_HEADER: started.version, "Cache-Control": "no-cache"}
            return _EventStream(events, on_close=lambda: (started.cancel(), release()), headers=headers)
        try:
            completion = await _collect(started, http, deadline)
        except _ClientLeft:
            metrics.cancelled(served.endpoint)
            return Response(status_code=499)  # nobody reads it
        except Exception as error:
            failed(served, error)
            raise _as_serve_error(error, settings) from None
        finally:
            started.cancel()
            release(time.perf_counter() - served.started)
        body = _completion_body(completion, chat, ident, created)
        finished(served, body)  # the client is still there: the answer goes out now
        if shadow_requests is not None:
            _background(shadow(shadow_requests, served, body, chat))
        return JSONResponse(body, headers={VERSION_HEADER: completion.version})

    def failed(served: Served, error: BaseException) -> None:
        """Count a request that failed; during a live experiment, a server error counts against its arm."""
        metrics.failed(served.endpoint, time.perf_counter() - served.started)
        if served.arm is None or live is None:
            return
        server_error = _status(error) >= 500
        if server_error:
            experiment = live.experiment
            version = engine.version if served.arm == CHAMPION or experiment is None else experiment.version_id
            metrics.live_failure(served.arm, version)
        live.answered(served.arm, failed=server_error)

    def route(served: Served) -> tuple[Engine, str | None]:
        """The engine that answers, and the request's arm in the live experiment (None: not part of one).

        A request for the alias is routed by the experiment; one that names a version gets that version
        outside it (the running challenger by its name, else the champion), so a ``tao serve --engine
        proxy`` in front, which names the version its own routing chose, is not routed twice."""
        if live is None:
            return engine, None
        challenger, experiment = live.challenger, live.experiment
        if served.asked != settings.model_alias:
            if experiment is None or served.asked != experiment.version_id:
                return engine, None
            if challenger is None and live.draining is not None and live.draining.version == served.asked:
                return live.draining, None  # its experiment just ended: a proxy in front may not know yet
            if challenger is None:  # never the champion's answer under the challenger's name
                raise ServeError(
                    503, f"{served.asked} is starting on this server; try again", "model", "unavailable",
                    **{"Retry-After": "1"},
                )  # fmt: skip
            return challenger, None
        arm = live.arm(served.sticky)  # CANARY only while a challenger serves; no await in between
        return (challenger if arm == CANARY else engine), (arm if live.active else None)

    async def shadow(requests: list[GenerationRequest], served: Served, champion_body: dict, chat: bool) -> None:
        """The challenger answers the same request in the background; logged beside the champion's, never returned."""
        challenger = live.challenger if live is not None else None
        if challenger is None or request_log is None or live.shadow_slots.locked():
            metrics.unlogged("shadow_skipped")  # the challenger is busy or gone: this request is not compared
            return
        async with live.shadow_slots:
            started = time.perf_counter()
            try:
                completions = [await challenger.complete(request) for request in requests]
            except Exception as error:  # noqa: BLE001 - a shadow failure is counted, never seen by the client
                logger.warning("tao serve: the shadow answer failed: %s", error)
                metrics.unlogged("shadow_failed")
                if _status(error) >= 500:
                    metrics.live_failure(SHADOW, challenger.version)
                live.answered(SHADOW, failed=_status(error) >= 500)
                return
        merged = completions[0]
        if len(completions) > 1:
            merged = dataclasses.replace(
                merged, choices=[choice for c in completions for choice in c.choices],
                prompt_tokens=sum(c.prompt_tokens for c in completions),
            )  # fmt: skip
        body = _completion_body(merged, chat, new_completion_id(chat), int(time.time()))
        paired = [_choice_id(champion_body["id"], choice["index"]) for choice in champion_body["choices"]]
        shadowed = dataclasses.replace(served, started=started, arm=SHADOW)
        finished(shadowed, body, metrics_too=False, pairs=paired)

    def finished(served: Served, body: dict, metrics_too: bool = True, pairs: list[str] | None = None) -> None:
        """Count the answer, and log it: one row per choice, an OpenAI request and its response (that choice)."""
        seconds = time.perf_counter() - served.started
        if metrics_too:
            metrics.answered(
                served.endpoint, seconds, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
            )
        if served.arm is not None:
            metrics.live_answer(served.arm, body["model"], seconds)
            live.answered(served.arm, failed=False)
        if request_log is None:
            return
        if served.unlogged_because is not None:
            metrics.unlogged(served.unlogged_because)
            return
        received_at, latency_ms = _iso_now(), round(seconds * 1000, 1)
        logged = sum(
            request_log.write(
                {
                    "id": body["id"],
                    "request": served.requests[choice["index"] // served.n],
                    "response": {**body, "choices": [choice]},
                    "task": served.task,
                    "model_version": body["model"],
                    "latency_ms": latency_ms,
                    "endpoint": served.endpoint,
                    "received_at": received_at,
                    **_live_fields(served.arm, pairs, choice["index"]),
                }
            )
            for choice in body["choices"]
        )
        metrics.logged(logged)

    return app


class _ClientLeft(Exception):  # noqa: N818 - an event, not a fault
    pass


class _EventStream(StreamingResponse):
    """A server-sent event stream that always runs ``on_close``, even when the client left before its first byte."""

    def __init__(self, content, *, on_close: Callable[[], object], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _once(function: Callable[..., None]) -> Callable[..., None]:
    done = False

    def call(*args) -> None:
        nonlocal done
        if not done:
            done = True
            function(*args)

    return call


async def _start(engine: Engine, requests: list[GenerationRequest]) -> Stream:
    """The answer to one request, or to several prompts of one request as a single stream (their choices
    numbered prompt by prompt, as OpenAI does: choice ``p * n + i`` is sample ``i`` of prompt ``p``)."""
    if len(requests) == 1:
        return await engine.stream(requests[0])
    for _ in range(3):
        tasks = [asyncio.ensure_future(engine.stream(request)) for request in requests]
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # cancelled (the deadline) or not: streams that will not be returned stop generating
            streams = [task.result() for task in tasks if task.done() and not task.cancelled() and not task.exception()]
            if len(streams) < len(tasks) or len({stream.version for stream in streams}) > 1:
                for stream in streams:
                    stream.cancel()
        for task in tasks:
            if task.cancelled() or task.exception():
                raise task.exception() if not task.cancelled() else asyncio.CancelledError()
        if len({stream.version for stream in streams}) == 1:  # else a swap came between them: start again
            return _joined(streams, requests[0].n)
    raise EngineError("the champion changed while the prompts were starting; try again", status=503, retry_after=1)


def _joined(streams: list[Stream], n: int) -> Stream:
    """Several prompts' streams as one: their choices in prompt order, their text prompt after prompt."""
    completion = Completion(streams[0].version, [choice for s in streams for choice in s.completion.choices])

    async def deltas() -> AsyncIterator[Delta]:
        for p, stream in enumerate(streams):
            async for delta in stream.deltas:
                yield dataclasses.replace(delta, index=p * n + delta.index)
        completion.choices = [choice for s in streams for choice in s.completion.choices]
        completion.prompt_tokens = sum(s.completion.prompt_tokens for s in streams)  # known once each is read

    def cancel() -> None:
        for stream in streams:
            stream.cancel()

    return Stream(completion.version, deltas(), completion, cancel)


async def _collect(stream: Stream, http: Request, deadline: float) -> Completion:
    """Read the whole answer, unless the client leaves first (then nothing more is generated for it)."""

    async def read() -> Completion:
        async for _ in stream.deltas:
            pass
        return stream.completion

    async def client_left() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    reading, watching = asyncio.ensure_future(read()), asyncio.ensure_future(client_left())
    try:
        async with asyncio.timeout_at(deadline):
            done, _ = await asyncio.wait({reading, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    if reading in done:
        return reading.result()
    raise _ClientLeft


def _status(error: BaseException) -> int:
    """The HTTP status a failure is answered with (500 for anything unforeseen)."""
    if isinstance(error, (ServeError, RequestRefused, EngineError)):
        return error.status
    return 504 if isinstance(error, TimeoutError) else 500


def _as_serve_error(error: Exception, settings: ServeSettings) -> ServeError:
    if isinstance(error, ServeError):
        return error
    if isinstance(error, RequestRefused):
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
        return ServeError(error.status, str(error), error.param, error.code, **headers)
    if isinstance(error, TimeoutError):
        return ServeError(504, _deadline_message(settings), code="timeout")
    if isinstance(error, EngineError):
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
        return ServeError(error.status, str(error), code=error.code, **headers)
    raise error


def _deadline_message(settings: ServeSettings) -> str:
    return f"the answer did not finish within serve.request_timeout_s ({settings.request_timeout_s} s)"


def _param(location: tuple) -> str:
    """pydantic's location as OpenAI names a parameter: ('body', 'messages', 0, 'content') -> messages[0].content."""
    text = ""
    for part in location:
        if part == "body" and not text:
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).startswith(("function-", "str", "list[", "dict[", "literal[")):
            text += f".{part}" if text else str(part)
    return text


def _user(body: _Sampling) -> str | None:
    """OpenAI's ``user`` field (an end-user id the app chose), when the request has one."""
    user = (body.model_extra or {}).get("user")
    return user if isinstance(user, str) and user else None


def _choice_id(ident: str, index: int) -> str:
    """The response id ingestion gives choice ``index`` of an answer (its id, ':index' after the first)."""
    return ident if index == 0 else f"{ident}:{index}"


def _live_fields(arm: str | None, pairs: list[str] | None, index: int) -> dict[str, str]:
    if arm is None:
        return {}
    fields = {"live_arm": arm}
    if pairs is not None and index < len(pairs):
        fields["live_pair"] = pairs[index]
    return fields


_BACKGROUND: set[asyncio.Task] = set()


def _background(work) -> None:
    """Run ``work`` after the response, keeping a reference so the task is not collected mid-way."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _task(body: _Sampling, settings: ServeSettings) -> str:
    task = (body.metadata or {}).get("task")
    return task.strip() if isinstance(task, str) and task.strip() else settings.default_task


def _check_model(name: str, watcher: ChampionWatcher, alias: str, live: LiveRouter | None) -> None:
    challenger = live.experiment.version_id if live is not None and live.experiment is not None else None
    if name not in (alias, challenger) and not watcher.knows(name):
        raise ServeError(
            404, f"model {name!r} is not served here: ask for {alias!r} (the champion)", "model", "model_not_found"
        )


def _generation_request(
    body: _Sampling, settings: ServeSettings, *, messages=None, prompt=None, max_tokens: int | None = None
) -> GenerationRequest:
    asked = max_tokens or body.max_tokens
    limit = asked or settings.default_max_tokens
    if limit > settings.max_tokens_limit:
        raise ServeError(
            400, f"max_tokens: {limit} is above this server's limit ({settings.max_tokens_limit})", "max_tokens"
        )
    if body.n > settings.max_batch_rows:
        raise ServeError(400, f"n: at most {settings.max_batch_rows} on this server (serve.max_batch_rows)", "n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ServeError(400, "stop: at most 4 sequences", "stop")
    return GenerationRequest(
        messages,
        prompt,
        limit,
        body.temperature,
        body.top_p,
        body.n,
        body.seed,
        tuple(s for s in stops if s),
        max_tokens_asked=asked is not None,
    )


def _completion_body(completion: Completion, chat: bool, ident: str, created: int) -> dict:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        if chat
        else {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        for i, c in enumerate(completion.choices)
    ]
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": completion.version,
        "choices": choices,
        "usage": _usage(completion),
    }


def _usage(completion: Completion) -> dict:
    tokens = completion.completion_tokens
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": tokens,
            "total_tokens": completion.prompt_tokens + tokens}  # fmt: skip


async def _sse(
    stream: Stream,
    chat: bool,
    ident: str,
    created: int,
    served: Served,
    deadline: float,
    settings: ServeSettings,
    metrics: ServeMetrics,
    on_done: Callable[[], None],
    on_failed: Callable[[Served, BaseException], None],
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": ident, "object": kind, "created": created, "model": stream.version, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(len(stream.completion.choices))]  # fmt: skip
            yield chunk(roles)
        async with asyncio.timeout_at(deadline):
            async for delta in stream.deltas:
                if chat:
                    part = {
                        "index": delta.index,
                        "delta": {"content": delta.text},
                        "finish_reason": delta.finish_reason,
                    }
                else:
                    part = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason}
                yield chunk([part])
        yield chunk([], _usage(stream.completion))
        on_done()  # the answer is whole at the client: logged before [DONE], so a client that has read it finds it
        yield "data: [DONE]\n\n"
    except (EngineError, TimeoutError) as error:
        on_failed(served, error)
        failure = _as_serve_error(error, settings)
        yield f"data: {json.dumps(_error_body(failure))}\n\n"
    except asyncio.CancelledError:  # the client went away
        metrics.cancelled(served.endpoint)
        raise


def _error_body(error: ServeError) -> dict:
    kind = ERROR_TYPES.get(error.status, "server_error")
    message, param = _printable(error.message), _printable(error.param) if error.param else error.param
    return {"error": {"message": message, "type": kind, "param": param, "code": error.code}}


def _printable(text: str) -> str:
    """Text that can be sent whatever the client put in it (a lone surrogate is shown as its escape)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error_response(error: ServeError, version: str | Callable[[], str]) -> JSONResponse:
    version = version() if callable(version) else version
    headers = {VERSION_HEADER: version, **error.headers}
    return JSONResponse(_error_body(error), status_code=error.status, headers=headers)


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

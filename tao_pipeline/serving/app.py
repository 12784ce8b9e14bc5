"""The HTTP API: OpenAI's chat and text completions (streaming too), models, health and Prometheus metrics.

Every response names the version that wrote it (the ``model`` field and the ``X-Tao-Model-Version``
header), and every answered request becomes a row in the inbox (see ``request_log``).

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

from tao_pipeline.serving.champion import ChampionWatcher
from tao_pipeline.serving.engine import Completion, Engine, EngineError, GenerationRequest, RequestRefused, Stream
from tao_pipeline.serving.metrics import ServeMetrics
from tao_pipeline.serving.request_log import RequestLog
from tao_pipeline.settings import ServeSettings

logger = logging.getLogger("tao_pipeline.serve")
VERSION_HEADER = "X-Tao-Model-Version"
OPEN_PATHS = frozenset({"/health"})  # for load balancers; everything else needs the key when keys are set
INT64 = 2**63
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
    prompt: str
    system: str | None
    started: float
    unlogged_because: str | None = None  # why this request gives no training row


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
) -> FastAPI:
    metrics = ServeMetrics(request_log, engine)
    admission = Admission(settings.max_batch_rows + settings.max_queued_rows, settings.max_batch_rows)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher.on_swap = metrics.swapped
        if request_log is not None:
            request_log.start()
        await watcher.start(engine)
        try:
            yield
        finally:
            await watcher.stop()
            await engine.close()
            if request_log is not None:
                request_log.close()

    app = FastAPI(title="tao serve", lifespan=lifespan)
    app.state.metrics, app.state.request_log, app.state.admission = metrics, request_log, admission
    app.state.watcher, app.state.engine = watcher, engine
    app.add_middleware(Gate, api_keys=api_keys, settings=settings, version=lambda: engine.version)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return _error_response(error, engine.version)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(ServeError(error.status_code, str(error.detail)), engine.version)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
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
        return JSONResponse({"object": "list", "data": data}, headers={VERSION_HEADER: engine.version})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, http: Request) -> Response:
        _check_model(body.model, watcher, settings.model_alias)
        if len(body.messages) > settings.max_messages:
            raise ServeError(400, f"messages: at most {settings.max_messages} (serve.max_messages)", "messages")
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ServeError(400, "messages: at least one message with role 'user' is needed", "messages")
        systems = [m["content"] for m in messages if m["role"] == "system"]
        request = _generation_request(body, settings, messages=messages, max_tokens=body.max_completion_tokens)
        served = Served("chat", _task(body, settings), users[-1], systems[0] if systems else None, time.perf_counter())
        if len(users) > 1 or any(m["role"] == "assistant" for m in messages):
            # A round replays a prompt on its own: the last turn without its conversation would teach
            # the model to answer a question nobody asked in that form.
            served.unlogged_because = "multi_turn"
        return await answer(request, served, body.stream, True, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Response:
        _check_model(body.model, watcher, settings.model_alias)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ServeError(400, "prompt: give one non-empty string (batches of prompts are not supported)", "prompt")
        request = _generation_request(body, settings, prompt=prompts[0])
        served = Served("completions", _task(body, settings), prompts[0], None, time.perf_counter())
        return await answer(request, served, body.stream, False, http)

    async def answer(request: GenerationRequest, served: Served, stream: bool, chat: bool, http: Request) -> Response:
        if not watcher.ready:
            raise ServeError(503, f"no model loaded yet: {watcher.last_error}", code="unavailable")
        try:
            admission.enter(request.n)
        except ServeError:
            metrics.busy(served.endpoint)
            raise
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        request = dataclasses.replace(request, deadline=deadline)
        release = _once(lambda seconds=None: admission.leave(request.n, seconds))
        try:
            async with asyncio.timeout_at(deadline):
                started = await engine.stream(request)
        except BaseException as error:
            release()
            if isinstance(error, Exception):
                metrics.failed(served.endpoint, time.perf_counter() - served.started)
                raise _as_serve_error(error, settings) from None
            raise
        if stream:
            events = _sse(
                started, chat, served, deadline, settings, metrics, lambda: finished(served, started.completion)
            )
            headers = {VERSION_HEADER: started.version, "Cache-Control": "no-cache"}
            return _EventStream(events, on_close=lambda: (started.cancel(), release()), headers=headers)
        try:
            completion = await _collect(started, http, deadline)
        except _ClientLeft:
            metrics.cancelled(served.endpoint)
            return Response(status_code=499)  # nobody reads it
        except Exception as error:
            metrics.failed(served.endpoint, time.perf_counter() - served.started)
            raise _as_serve_error(error, settings) from None
        finally:
            started.cancel()
            release(time.perf_counter() - served.started)
        finished(served, completion)  # the client is still there: the answer goes out now
        return JSONResponse(_completion_body(completion, chat), headers={VERSION_HEADER: completion.version})

    def finished(served: Served, completion: Completion) -> None:
        seconds = time.perf_counter() - served.started
        metrics.answered(served.endpoint, seconds, completion)
        if request_log is None:
            return
        if served.unlogged_because is not None:
            metrics.unlogged(served.unlogged_because)
            return
        logged = sum(
            request_log.write(
                {
                    "id": f"tao-serve-{uuid.uuid4().hex}",
                    "prompt": served.prompt,
                    "system": served.system,
                    "task": served.task,
                    "model_version": completion.version,
                    "response": choice.text,
                    "finish_reason": choice.finish_reason,
                    "latency_ms": round(seconds * 1000, 1),
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": choice.completion_tokens,
                    "endpoint": served.endpoint,
                    "received_at": _iso_now(),
                }
            )
            for choice in completion.choices
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


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _task(body: _Sampling, settings: ServeSettings) -> str:
    task = (body.metadata or {}).get("task")
    return task.strip() if isinstance(task, str) and task.strip() else settings.default_task


def _check_model(name: str, watcher: ChampionWatcher, alias: str) -> None:
    if name != alias and not watcher.knows(name):
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


def _completion_body(completion: Completion, chat: bool) -> dict:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        if chat
        else {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        for i, c in enumerate(completion.choices)
    ]
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
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
    served: Served,
    deadline: float,
    settings: ServeSettings,
    metrics: ServeMetrics,
    on_done: Callable[[], None],
) -> AsyncIterator[str]:
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
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
        yield "data: [DONE]\n\n"
        on_done()
    except (EngineError, TimeoutError) as error:
        metrics.failed(served.endpoint, time.perf_counter() - served.started)
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

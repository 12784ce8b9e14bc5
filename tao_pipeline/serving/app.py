"""The HTTP API: OpenAI's chat and text completions (streaming too), models, health and Prometheus metrics.

Every response names the version that wrote it (the ``model`` field and the ``X-Tao-Model-Version``
header), and every answered request becomes a row in the inbox (see ``request_log``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tao_pipeline.serving.champion import ChampionWatcher
from tao_pipeline.serving.engine import Completion, Engine, EngineError, GenerationRequest
from tao_pipeline.serving.metrics import ServeMetrics
from tao_pipeline.serving.request_log import RequestLog
from tao_pipeline.settings import ServeSettings

logger = logging.getLogger("tao_pipeline.serve")
VERSION_HEADER = "X-Tao-Model-Version"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (user, logprobs...) are accepted
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Sampling):
    prompt: str | list[str]


@dataclass
class Served:
    """One answered request, as the log and the metrics see it."""

    endpoint: str
    task: str
    prompt: str
    system: str | None
    started: float
    unlogged_because: str | None = None  # why this request gives no training row


def build_app(
    engine: Engine,
    watcher: ChampionWatcher,
    settings: ServeSettings,
    request_log: RequestLog | None,
    api_keys: tuple[str, ...] = (),
) -> FastAPI:
    metrics = ServeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher.on_swap = metrics.swapped
        await watcher.start(engine)
        if request_log is not None:
            request_log.start()
        try:
            yield
        finally:
            await watcher.stop()
            await engine.close()
            if request_log is not None:
                request_log.close()

    app = FastAPI(title="tao serve", lifespan=lifespan)
    app.state.metrics, app.state.request_log = metrics, request_log
    app.state.watcher, app.state.engine = watcher, engine

    def authorized(request: Request) -> None:
        if not api_keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.encode(), k.encode()) for k in api_keys):
            raise HTTPException(401, "missing or wrong bearer key (Authorization: Bearer <key>)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), engine.version)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(400, f"{where}: {first.get('msg')}", engine.version)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if watcher.ready else "starting"
        body = {"status": status, "model_version": engine.version, "engine": engine.name, **watcher.status()}
        return JSONResponse(body, status_code=200 if watcher.ready else 503, headers={VERSION_HEADER: engine.version})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> JSONResponse:
        now = int(time.time())
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "tao", "root": engine.version}
            for name in (settings.model_alias, engine.version)
        ]
        return JSONResponse({"object": "list", "data": data}, headers={VERSION_HEADER: engine.version})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionBody) -> Response:
        _check_model(body.model, watcher, settings.model_alias)
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise HTTPException(400, "messages: at least one message with role 'user' is needed")
        systems = [m["content"] for m in messages if m["role"] == "system"]
        request = _generation_request(body, settings, messages=messages, max_tokens=body.max_completion_tokens)
        served = Served("chat", _task(body, settings), users[-1], systems[0] if systems else None, time.perf_counter())
        if len(users) > 1 or any(m["role"] == "assistant" for m in messages):
            # A round replays a prompt on its own: the last turn without its conversation would teach
            # the model to answer a question nobody asked in that form.
            served.unlogged_because = "multi_turn"
        return await answer(request, served, body.stream, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionBody) -> Response:
        _check_model(body.model, watcher, settings.model_alias)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise HTTPException(400, "prompt: give one non-empty string (batches of prompts are not supported)")
        request = _generation_request(body, settings, prompt=prompts[0])
        served = Served("completions", _task(body, settings), prompts[0], None, time.perf_counter())
        return await answer(request, served, body.stream, chat=False)

    async def answer(request: GenerationRequest, served: Served, stream: bool, chat: bool) -> Response:
        if not watcher.ready:
            return _error(503, f"no model loaded yet: {watcher.last_error}", "")
        try:
            if not stream:
                completion = await engine.complete(request)
                finished(served, completion)
                body = _completion_body(completion, chat)
                return JSONResponse(body, headers={VERSION_HEADER: completion.version})
            started = await engine.stream(request)
        except EngineError as error:
            metrics.failed(served.endpoint, time.perf_counter() - served.started)
            return _error(502 if engine.name == "proxy" else 500, str(error), engine.version)
        events = _sse(started, chat, lambda: finished(served, started.completion), metrics, served)
        headers = {VERSION_HEADER: started.version, "Cache-Control": "no-cache"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    def finished(served: Served, completion: Completion) -> None:
        seconds = time.perf_counter() - served.started
        metrics.answered(served.endpoint, seconds, completion)
        if request_log is None:
            return
        if served.unlogged_because is not None:
            metrics.unlogged(served.unlogged_because)
            return
        for choice in completion.choices:
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
        metrics.logged(len(completion.choices))

    return app


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _task(body: _Sampling, settings: ServeSettings) -> str:
    task = (body.metadata or {}).get("task")
    return task.strip() if isinstance(task, str) and task.strip() else settings.default_task


def _check_model(name: str, watcher: ChampionWatcher, alias: str) -> None:
    if name != alias and not watcher.knows(name):
        raise HTTPException(404, f"model {name!r} is not served here: ask for {alias!r} (the champion)")


def _generation_request(
    body: _Sampling, settings: ServeSettings, *, messages=None, prompt=None, max_tokens: int | None = None
) -> GenerationRequest:
    limit = max_tokens or body.max_tokens or settings.default_max_tokens
    if limit > settings.max_tokens_limit:
        raise HTTPException(400, f"max_tokens: {limit} is above this server's limit ({settings.max_tokens_limit})")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise HTTPException(400, "stop: at most 4 sequences")
    return GenerationRequest(
        messages, prompt, limit, body.temperature, body.top_p, body.n, body.seed, tuple(s for s in stops if s)
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


async def _sse(stream, chat: bool, on_done, metrics: ServeMetrics, served: Served) -> AsyncIterator[str]:
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
        async for delta in stream.deltas:
            if chat:
                part = {"index": delta.index, "delta": {"content": delta.text}, "finish_reason": delta.finish_reason}
            else:
                part = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason}
            yield chunk([part])
        yield chunk([], _usage(stream.completion))
        yield "data: [DONE]\n\n"
        on_done()
    except EngineError as error:
        metrics.failed(served.endpoint, time.perf_counter() - served.started)
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
    except asyncio.CancelledError:  # the client went away
        metrics.failed(served.endpoint, time.perf_counter() - served.started)
        raise


def _error(status: int, message: str, version: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers={VERSION_HEADER: version})


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

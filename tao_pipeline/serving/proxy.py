"""The proxy engine: `tao serve` in front of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp).

Requests go to the upstream through the official ``openai`` client under the champion's name
there (``serve.upstream_model_names`` maps a version id to it; by default the version id itself).
A swap makes the new champion answer in one of two ways:

- the upstream already serves it under its name (``/v1/models`` lists it): requests are routed there;
- else, if ``serve.load_lora_adapters`` is on and the champion is a LoRA adapter on the model the
  upstream serves (tuned from ``serve.upstream_base_version``: the base model's weights, as every round's
  with ``flywheel.start_from = "base"``, or a first round's), it is loaded at run time with
  vLLM's ``POST /v1/load_lora_adapter`` (vLLM started with ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the adapter folder must be readable by the server).

Otherwise the swap fails with the reason, and the current champion keeps answering.

An upstream that is down or frozen is seen at once, and nobody waits long for it:

- ``/health`` reflects it: the upstream's ``/v1/models`` is asked every ``probe_seconds`` (with a short
  timeout), and /health answers 503 while it does not answer or while the circuit is open;
- answers are always streamed from the upstream (and gathered for a client that asked for one whole
  answer), so an upstream silent for ``stall_s`` (``serve.upstream_stall_s``) is known to be stuck while a
  long answer that keeps coming is not cut; the request's own deadline (``serve.request_timeout_s``)
  bounds the whole, retries included;
- a circuit breaker: after ``breaker_failures`` failures in a row (connection errors, timeouts, 5xx)
  requests fail at once with 503 and Retry-After for ``breaker_cooldown_s``, then requests may try again;
  a probe the upstream answers closes the circuit at once (it was the trial call).

An upstream's 4xx is the client's own mistake (a prompt too long for it, say) and is passed on as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import openai
from circuitbreaker import CircuitBreaker
from openai import AsyncOpenAI

from tao_pipeline.registry import ModelVersion
from tao_pipeline.serving.engine import (
    Choice,
    Completion,
    Delta,
    EngineError,
    GenerationRequest,
    RequestRefused,
    Stream,
    SwapError,
)

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0
DEADLINE_MARGIN_S = 0.1  # the proxy gives up this much before the app does, so its timeout is counted


class _Breaker(CircuitBreaker):
    """A circuit breaker that a cancelled call (the client left) neither trips nor resets."""

    def __exit__(self, kind, error, traceback):
        if kind is not None and issubclass(kind, asyncio.CancelledError | GeneratorExit):
            return False
        return super().__exit__(kind, error, traceback)


class ProxyEngine:
    name = "proxy"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model_names: dict[str, str] | None = None,
        load_lora_adapters: bool = False,
        upstream_base_version: str | None = None,
        stall_s: float = 30.0,
        max_retries: int = 2,
        probe_seconds: float = 5.0,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.model_names = dict(model_names or {})
        self.load_lora_adapters, self.upstream_base_version = load_lora_adapters, upstream_base_version
        self.client = AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or "none",
            timeout=stall_s,  # connect, and each read: a streamed answer's silence
            max_retries=max_retries,
        )
        self.breaker = _Breaker(
            failure_threshold=breaker_failures,
            recovery_timeout=breaker_cooldown_s,
            expected_exception=_upstream_fault,
            name=f"upstream {self.base_url}",
        )
        self.probe_seconds = probe_seconds
        self.in_flight = 0  # requests from their call until their answer is read or dropped (draining waits on it)
        self.upstream_error: str | None = "not asked yet"
        self._probe: asyncio.Task | None = None
        self._version = ""

    @property
    def version(self) -> str:
        return self._version

    def served_name(self, version_id: str) -> str:
        return self.model_names.get(version_id, version_id)

    async def start(self, champion: ModelVersion) -> None:
        if self._probe is None:
            self._probe = asyncio.create_task(self._probe_upstream())
        await self.switch_to(champion)

    def status(self) -> dict:
        open_for = max(0, self.breaker.open_remaining) if self.breaker.opened else 0
        return {
            "healthy": self.upstream_error is None and not self.breaker.opened,
            "upstream": self.base_url,
            "upstream_error": self.upstream_error,
            "circuit": self.breaker.state,
            "circuit_open_seconds": open_for,
            "failures_in_a_row": self.breaker.failure_count,
            "in_flight_requests": self.in_flight,
        }

    async def _probe_upstream(self) -> None:
        probe = self.client.with_options(timeout=min(PROBE_TIMEOUT_S, self.probe_seconds), max_retries=0)
        while True:
            try:
                await probe.models.list()
            except openai.OpenAIError as error:
                if self.upstream_error is None:
                    logger.error("tao serve: the upstream %s does not answer: %s", self.base_url, _reason(error))
                self.upstream_error = _reason(error)
            else:
                self.upstream_error = None
                if self.breaker.opened:  # the probe was the trial call: the upstream answers again
                    logger.warning("tao serve: the upstream %s answers again: circuit closed", self.base_url)
                    self.breaker.reset()
            await asyncio.sleep(self.probe_seconds)

    async def switch_to(self, champion: ModelVersion) -> None:
        name = self.served_name(champion.version_id)
        if name not in await self._upstream_models():
            await self._load_adapter(champion, name)
        self._version = champion.version_id

    async def _upstream_models(self) -> set[str]:
        try:
            return {model.id async for model in self.client.models.list()}
        except openai.OpenAIError as error:
            raise SwapError(f"cannot list the models of {self.base_url}: {_reason(error)}") from error

    async def _load_adapter(self, champion: ModelVersion, name: str) -> None:
        adapter = Path(str(champion.path)) / "adapter"
        if not self.load_lora_adapters:
            raise SwapError(
                f"{self.base_url} does not serve {name!r}: serve it there (vLLM: --served-model-name, or "
                "--lora-modules NAME=PATH), map it in serve.upstream_model_names, or set serve.load_lora_adapters"
            )
        if champion.tuned_from != self.upstream_base_version or not adapter.is_dir():
            raise SwapError(
                f"{champion.version_id} is not a LoRA adapter on {self.upstream_base_version} (it was tuned from "
                f"{champion.tuned_from}): export its merged weights (tao export) and serve them as {name!r}"
            )
        try:
            await self.client.post(
                "/load_lora_adapter", body={"lora_name": name, "lora_path": str(adapter)}, cast_to=object
            )
        except openai.OpenAIError as error:
            raise SwapError(f"{self.base_url} did not load the adapter {adapter}: {_reason(error)}") from error
        if name not in await self._upstream_models():
            raise SwapError(f"{self.base_url} accepted the adapter {name!r} but does not list it")

    def _closed_circuit(self) -> None:
        if self.breaker.opened:
            seconds = max(1, int(self.breaker.open_remaining))
            raise EngineError(
                f"upstream {self.base_url} failed {self.breaker.failure_count} times in a row: not tried again "
                f"for {seconds} s (last: {_reason(self.breaker.last_failure)})",
                status=503,
                code="upstream_unavailable",
                retry_after=seconds,
            )

    async def complete(self, request: GenerationRequest) -> Completion:
        stream = await self.stream(request)  # streamed from the upstream: a stall shows in seconds
        try:
            async for _ in stream.deltas:
                pass
        finally:
            stream.cancel()
        return stream.completion

    async def stream(self, request: GenerationRequest) -> Stream:
        version = self._version
        arguments = {**self._arguments(request, version), "stream": True, "stream_options": {"include_usage": True}}
        create = self.client.chat.completions.create if request.messages is not None else self.client.completions.create
        self._closed_circuit()
        done = self._count_in_flight()
        try:
            with self.breaker:
                async with _deadline(request.deadline):
                    chunks = await create(**arguments)
        except BaseException as error:
            done()
            if isinstance(error, openai.OpenAIError):
                raise self._failure(error) from error
            raise
        completion = Completion(version, [Choice() for _ in range(request.n)])
        deltas = self._deltas(chunks, completion, request.messages is not None, request.deadline, done)

        def cancel() -> None:
            done()
            asyncio.ensure_future(_close(chunks))

        return Stream(version, deltas, completion, cancel)

    def _count_in_flight(self) -> Callable[[], None]:
        """One more request in flight; the function returned counts it out, once however often it is called."""
        self.in_flight += 1
        counted = True

        def done() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.in_flight -= 1

        return done

    async def _deltas(
        self, chunks, completion: Completion, chat: bool, deadline: float | None, done: Callable[[], None]
    ) -> AsyncIterator[Delta]:
        try:
            with self.breaker:
                async with _deadline(deadline):
                    async for chunk in chunks:
                        if chunk.usage is not None:
                            completion.prompt_tokens = chunk.usage.prompt_tokens
                            _share_out(completion.choices, chunk.usage.completion_tokens)
                        for part in chunk.choices:
                            if part.index >= len(completion.choices):
                                continue
                            text = (part.delta.content or "") if chat else (part.text or "")
                            choice = completion.choices[part.index]
                            choice.text += text
                            choice.finish_reason = part.finish_reason or choice.finish_reason
                            yield Delta(part.index, text, part.finish_reason)
        except openai.OpenAIError as error:
            raise self._failure(error) from error
        except Exception as error:  # the HTTP client's own errors mid-stream: a stall is its read timeout
            message = f"upstream {self.base_url}: the answer stopped coming: {_reason(error)}"
            raise EngineError(message, status=502, code="upstream_error") from error
        finally:
            done()

    def _failure(self, error: openai.OpenAIError) -> Exception:
        """An upstream 4xx is the client's (its own status and message); anything else is the upstream's (502)."""
        if isinstance(error, openai.APIStatusError) and 400 <= error.status_code < 500:
            if error.status_code == 429:
                return RequestRefused(429, f"upstream {self.base_url} is busy: {_reason(error)}", retry_after=1)
            if error.status_code not in (401, 403, 404, 408):  # those are this server's setup, not the client's
                return RequestRefused(error.status_code, f"upstream {self.base_url}: {_reason(error)}")
        return EngineError(f"upstream {self.base_url}: {_reason(error)}", status=502, code="upstream_error")

    def _arguments(self, request: GenerationRequest, version: str) -> dict:
        arguments = {
            "model": self.served_name(version),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
        }
        if request.seed is not None:
            arguments["seed"] = request.seed
        if request.stop:
            arguments["stop"] = list(request.stop)
        if request.messages is not None:
            return {**arguments, "messages": request.messages}
        return {**arguments, "prompt": request.prompt}

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.client.close()


def _share_out(choices: list[Choice], tokens: int) -> None:
    """The upstream reports completion tokens for all choices together: share them out."""
    for choice in choices:
        choice.completion_tokens = tokens // len(choices)
    choices[0].completion_tokens += tokens % len(choices)


def _deadline(deadline: float | None):
    """The request's deadline, a moment early: a frozen upstream then fails here, where the circuit counts it."""
    if deadline is None:
        return contextlib.nullcontext()
    return asyncio.timeout_at(deadline - DEADLINE_MARGIN_S)


async def _close(chunks) -> None:
    with contextlib.suppress(Exception):
        await chunks.close()


def _upstream_fault(kind: type, error: BaseException) -> bool:
    """What opens the circuit: the upstream unreachable, silent, too slow or failing (5xx); not a client's
    mistake (a 4xx). Cancellations (the client left) are left out by ``_Breaker``."""
    if isinstance(error, openai.APIStatusError):
        return error.status_code >= 500
    return True


def _reason(error: BaseException | None) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.message)[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"

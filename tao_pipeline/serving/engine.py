"""What a serving engine is: requests in, text (whole or streamed) out, and a model that can be swapped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from tao_pipeline.registry import ModelVersion


class EngineError(RuntimeError):
    """The engine cannot answer (the upstream is down, the model failed): the client gets a 5xx."""

    def __init__(self, message: str, status: int = 500, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class RequestRefused(Exception):  # noqa: N818 - a refusal, not an internal error
    """This request cannot be answered as asked (too long, too many, a busy server): a 4xx for it alone."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after


class SwapError(RuntimeError):
    """A new champion could not be put behind the server; the current one keeps serving."""


@dataclass(frozen=True)
class GenerationRequest:
    """One API request, engine-neutral: chat ``messages``, or a raw ``prompt`` for /v1/completions."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens_asked: bool = True  # False: max_tokens is the server's default, shortened to fit the context
    deadline: float | None = None  # the event loop's time by which the answer must be whole

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished answer: which version wrote it, and its choices."""

    version: str
    choices: list[Choice]
    prompt_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)


@dataclass(frozen=True)
class Delta:
    """A piece of streamed text for choice ``index``; ``finish_reason`` set on its last piece."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Stream:
    """A streamed answer: the version is known before the first byte (it goes in the response header)."""

    version: str
    deltas: AsyncIterator[Delta]
    completion: Completion  # filled in as the deltas are read; complete once they are all read
    cancel: Callable[[], None] = lambda: None  # nobody will read the rest: stop generating it


class Engine(Protocol):
    name: str

    @property
    def version(self) -> str:
        """The model version answering new requests now."""
        ...

    async def start(self, champion: ModelVersion) -> None: ...

    async def complete(self, request: GenerationRequest) -> Completion: ...

    async def stream(self, request: GenerationRequest) -> Stream:
        """The answer as it comes. Raises RequestRefused for this request's own problem (a prompt too long),
        EngineError when the engine cannot answer; honours ``request.deadline`` or leaves it to the caller,
        and stops generating once ``Stream.cancel`` is called."""
        ...

    async def switch_to(self, champion: ModelVersion) -> None:
        """Serve ``champion`` from now on; requests in flight finish on the model they started with."""
        ...

    def status(self) -> dict:
        """What /health shows about the engine; ``healthy`` False makes /health answer 503."""
        ...

    async def close(self) -> None: ...

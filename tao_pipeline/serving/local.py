"""The local engine: the champion in this process (transformers), requests decoded together by continuous batching.

Each request is checked and tokenized on its own, off the worker, before it is queued: a prompt that
cannot be tokenized, or does not fit the model's context with its ``max_tokens``, is refused alone
(HTTP 400) and never reaches a batch.

One worker thread owns the model and runs a loop of steps. Between two steps, queued requests join
the running batch, first come first served, up to ``max_batch_rows`` rows (a request brings ``n``
rows): their prompts are prefilled on their own, a long prompt ``prefill_chunk_tokens`` at a time
between steps, and their cache is merged into the batch's (``RunningBatch``). Each step picks one
token for every row, each row with its own temperature, top-p and random generator (seeded from the
request's ``seed``), so requests with any sampling settings share a batch and a seed gives the same
answer whatever the company. A row leaves the batch the step it ends (EOS, its ``max_tokens``, a stop
string), or as soon as its client has gone: a long request never holds short ones, and nothing is
generated for a client that left.

A swap loads the new champion beside the current one: new requests go to it, while the old model's
rows finish in a batch of their own (both are stepped in turn until the old one is empty), so no
request fails or mixes versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tao_pipeline.common.threads import use_torch_threads
from tao_pipeline.generation.base import eos_token_ids
from tao_pipeline.generation.decoding import RunningBatch, elastic_cache
from tao_pipeline.generation.sampling import choose_tokens_per_row
from tao_pipeline.registry import ModelVersion
from tao_pipeline.registry.loading import load_model, load_tokenizer
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
SEED_STRIDE = 0x9E3779B97F4A7C15  # choice i of a seeded request draws from seed + i * this (mod 2**64)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: object
    tokenizer: object
    eos_ids: frozenset[int]
    context_tokens: int  # prompt and answer together

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            ids = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        return list(ids)


def load(version: ModelVersion, dtype: str, trust_remote_code: bool, max_context_tokens: int | None) -> LoadedModel:
    if not isinstance(version.path, Path):
        raise SwapError(f"{version.version_id} is a hub id ({version.path}); the local engine serves local weights")
    tokenizer = load_tokenizer(version.path, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_model(version.path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    try:
        elastic_cache(model, 1)
    except NotImplementedError as error:
        raise SwapError(f"{version.version_id}: {error}") from error
    eos = eos_token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    context = model_context(model, max_context_tokens)
    return LoadedModel(version.version_id, model, tokenizer, frozenset(eos), context)


def model_context(model, limit: int | None) -> int:
    """The positions the model was trained for (prompt and answer together), or ``limit`` if smaller."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    trained = getattr(config, "max_position_embeddings", None) or 2048
    return min(trained, limit) if limit else trained


class _Detokenizer:
    """A row's text, grown one token at a time without decoding the whole answer each step: the newest
    tokens are decoded with a few before them for context, and text waits while it ends in half a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._append(now[len(before) :])
            self._prefix, self._read = self._read, len(self.tokens)

    def finish(self) -> None:
        """What is still held back (a half character at the very end) is text too."""
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) > len(before):
            self._append(now[len(before) :])
        self._prefix = self._read = len(self.tokens)

    def _append(self, text: str) -> None:
        self.text = (self.text + text) if self.text else text.lstrip()

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loaded: LoadedModel
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # Delta | ("error", message)
    cancelled: bool = False  # set by the client's side: nobody will read the rest
    queued_at: float = field(default_factory=time.monotonic)

    def send(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping, nobody is listening
            self.cancelled = True

    def fail(self, message: str) -> None:
        if not self.cancelled:
            self.send(("error", message))
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    """One choice of one request in the running batch."""

    job: _Job
    index: int
    text: _Detokenizer
    generator: torch.Generator
    sent: int = 0  # characters of text already sent

    @property
    def request(self) -> GenerationRequest:
        return self.job.request

    def take(self, token: int, eos_ids: frozenset[int]) -> bool:
        """The row's next token: its text goes out; True when the row is done."""
        if token in eos_ids:
            self._finish("stop", counted=1)
            return True
        self.text.add(token)
        stop_at = _first_stop(self.text.text, self.request.stop, self.sent)
        if stop_at is not None:
            self._finish("stop", cut=stop_at)
            return True
        if len(self.text.tokens) >= self.request.max_tokens:
            self._finish("length")
            return True
        hold = max((len(stop) - 1 for stop in self.request.stop), default=0)  # may be the start of a stop string
        self._send(len(self.text.text) - hold)
        return False

    def _send(self, end: int) -> None:
        if end > self.sent:
            self.job.send(Delta(self.index, self.text.text[self.sent : end]))
            self.sent = end

    def _finish(self, reason: str, cut: int | None = None, counted: int = 0) -> None:
        if cut is None:
            self.text.finish()
        end = len(self.text.text) if cut is None else cut
        final = self.text.text[self.sent : end] if end > self.sent else ""
        self.job.send(Delta(self.index, final, reason, len(self.text.tokens) + counted))


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string begins, looking only where a new one can be (after the text already sent)."""
    positions = [found for stop in stops if stop and (found := text.find(stop, sent)) >= 0]
    return min(positions) if positions else None


@dataclass(eq=False)
class _Batch:
    """The running rows of one model version in one lane: ``short`` rows, or ``long`` ones (past
    ``long_row_tokens``), decoded apart so that the short ones do not attend over a long one's width."""

    loaded: LoadedModel
    decoding: RunningBatch
    lane: str = "short"
    rows: list[_Row] = field(default_factory=list)


@dataclass(eq=False)
class _Chunked:
    """A prompt longer than ``prefill_chunk_tokens``, prefilled a chunk per step."""

    job: _Job
    batch: RunningBatch | None = None
    done: int = 0


class LocalEngine:
    name = "local"

    def __init__(
        self,
        *,
        dtype: str = "auto",
        max_batch_rows: int = 16,
        batch_window_s: float = 0.02,
        prefill_chunk_tokens: int = 512,
        long_row_tokens: int = 512,
        long_rows_share: float = 0.25,
        max_context_tokens: int | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        self.dtype, self.trust_remote_code, self.threads = dtype, trust_remote_code, threads
        self.max_batch_rows, self.batch_window_s = max_batch_rows, batch_window_s
        self.prefill_chunk_tokens, self.max_context_tokens = prefill_chunk_tokens, max_context_tokens
        self.long_row_tokens, self.long_rows_share = long_row_tokens, long_rows_share
        self._long_credit = 0.0  # steps owed to the long lane while short rows decode
        self._loaded: LoadedModel | None = None
        self._queue: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batches: list[_Batch] = []  # the current model's lanes, and an older model's while they drain
        self._chunked: _Chunked | None = None
        self._worker = threading.Thread(target=self._work, name="tao-serve-local", daemon=True)
        self.step_rows: deque[int] = deque(maxlen=5000)  # rows decoded by each step, most recent last
        self.steps = 0
        self.requests_started = 0  # requests that joined a batch (prefilled)

    @property
    def version(self) -> str:
        return self._loaded.version if self._loaded else ""

    async def start(self, champion: ModelVersion) -> None:
        self._loaded = await asyncio.to_thread(self._load, champion)
        self._worker.start()

    async def switch_to(self, champion: ModelVersion) -> None:
        self._loaded = await asyncio.to_thread(self._load, champion)  # requests from now on use it

    def _load(self, champion: ModelVersion) -> LoadedModel:
        try:
            return load(champion, self.dtype, self.trust_remote_code, self.max_context_tokens)
        except SwapError:
            raise
        except Exception as error:  # noqa: BLE001 - any load failure keeps the current model serving
            raise SwapError(f"cannot load {champion.version_id} from {champion.path}: {error}") from error

    def status(self) -> dict:
        with self._wake:
            queued = sum(job.request.n for job in self._queue)
        running = sum(len(batch.rows) for batch in self._batches)
        return {"healthy": self._worker.is_alive() or not self._loaded, "queued_rows": queued, "running_rows": running}

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._worker.is_alive():
            await asyncio.to_thread(self._worker.join, 30)

    async def complete(self, request: GenerationRequest) -> Completion:
        stream = await self.stream(request)
        try:
            async for _ in stream.deltas:
                pass
        finally:
            stream.cancel()
        return stream.completion

    async def stream(self, request: GenerationRequest) -> Stream:
        loaded = self._loaded
        if loaded is None:
            raise EngineError("no model loaded yet", status=503)
        ids = await asyncio.to_thread(_encode, loaded, request)  # this request's own cost, off the worker
        request = _fit_to_context(request, len(ids), loaded.context_tokens)
        job = _Job(request, loaded, ids, asyncio.get_running_loop())
        with self._wake:
            if self._closing:
                raise EngineError("the server is stopping", status=503)
            self._queue.append(job)
            self._wake.notify()
        completion = Completion(loaded.version, [Choice() for _ in range(request.n)], len(ids))

        def cancel() -> None:
            job.cancelled = True

        return Stream(loaded.version, _deltas(job, completion), completion, cancel)

    # -- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        if self.threads:  # in this thread: torch's count is OpenMP's, kept per thread
            use_torch_threads(self.threads, "serve.threads")
        with torch.inference_mode():
            while self._wait_for_work():
                self._admit()
                self._prefill_chunk()
                for batch in self._batches_to_step():
                    self._step(batch)
                self._batches = [batch for batch in self._batches if batch.rows or batch.loaded is self._loaded]
        self._fail_everything("the server is stopping")

    def _batches_to_step(self) -> list[_Batch]:
        """Every lane, except that long rows yield to short ones: while a short row decodes, the long lane
        takes ``long_rows_share`` of the steps. Rows that have had the least service go first (a short
        answer is not made to wait a long one's step every token), and long rows still make progress."""
        batches = list(self._batches)
        if not any(batch.rows and batch.lane == "short" for batch in batches):
            self._long_credit = 0.0
            return batches
        self._long_credit += self.long_rows_share
        if self._long_credit >= 1.0:
            self._long_credit -= 1.0
            return batches
        return [batch for batch in batches if batch.lane == "short"]

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do; when idle, give the first request's company a moment to come."""
        with self._wake:
            if self._closing:
                return False
            if self._running_rows() or self._chunked is not None:
                return True
            while not self._queue and not self._closing:
                self._wake.wait()
            if self.batch_window_s > 0 and not self._closing:
                deadline = time.monotonic() + self.batch_window_s
                while (left := deadline - time.monotonic()) > 0 and self._queued_rows() < self.max_batch_rows:
                    self._wake.wait(left)
            return not self._closing

    def _running_rows(self) -> int:
        return sum(len(batch.rows) for batch in self._batches)

    def _queued_rows(self) -> int:
        return sum(job.request.n for job in self._queue)

    def _admit(self) -> None:
        """Queued requests join, first come first served, while their rows fit: short prompts prefilled
        together in one pass (up to ``prefill_chunk_tokens``), a long one started in chunks."""
        free = self.max_batch_rows - self._running_rows()
        if self._chunked is not None:
            free -= self._chunked.job.request.n
        group: list[_Job] = []
        tokens = 0
        with self._wake:
            while self._queue:
                job = self._queue[0]
                if job.cancelled:
                    self._queue.popleft()
                    continue
                long = len(job.prompt_ids) > self.prefill_chunk_tokens
                if job.request.n > free or (long and (group or self._chunked is not None)):
                    break
                if group and (
                    tokens + len(job.prompt_ids) > self.prefill_chunk_tokens or job.loaded is not group[0].loaded
                ):
                    break
                self._queue.popleft()
                free -= job.request.n
                if long:
                    self._chunked = _Chunked(job)
                    break
                group.append(job)
                tokens += len(job.prompt_ids)
        if group:
            self._prefill(group)

    def _prefill(self, group: list[_Job]) -> None:
        loaded = group[0].loaded
        try:
            prefilled = RunningBatch.prefill(loaded.model, loaded.tokenizer.pad_token_id, [j.prompt_ids for j in group])
            prefilled.repeat([job.request.n for job in group])
        except Exception as error:  # noqa: BLE001 - these requests fail, the server and the running batch live
            logger.exception("tao serve: a prefill failed")
            for job in group:
                job.fail(f"{type(error).__name__}: {error}")
            return
        self._join(loaded, prefilled, group)

    def _prefill_chunk(self) -> None:
        chunked = self._chunked
        if chunked is None:
            return
        job = chunked.job
        if job.cancelled:
            self._chunked = None
            return
        piece = job.prompt_ids[chunked.done : chunked.done + self.prefill_chunk_tokens]
        try:
            if chunked.batch is None:
                chunked.batch = RunningBatch.prefill(job.loaded.model, job.loaded.tokenizer.pad_token_id, [piece])
            else:
                chunked.batch.extend(piece)
        except Exception as error:  # noqa: BLE001 - this request fails alone
            logger.exception("tao serve: a prefill failed")
            job.fail(f"{type(error).__name__}: {error}")
            self._chunked = None
            return
        chunked.done += len(piece)
        if chunked.done >= len(job.prompt_ids):
            self._chunked = None
            chunked.batch.repeat([job.request.n])
            self._join(job.loaded, chunked.batch, [job])

    def _join(self, loaded: LoadedModel, prefilled: RunningBatch, jobs: list[_Job]) -> None:
        long = max(len(job.prompt_ids) for job in jobs) > self.long_row_tokens
        batch = self._batch_for(loaded, "long" if long else "short")
        batch.decoding.join(prefilled)
        self.requests_started += len(jobs)
        batch.rows.extend(_Row(job, i, _Detokenizer(loaded.tokenizer), _generator(job, i))
                          for job in jobs for i in range(job.request.n))  # fmt: skip

    def _batch_for(self, loaded: LoadedModel, lane: str) -> _Batch:
        batch = next((b for b in self._batches if b.loaded is loaded and b.lane == lane), None)
        if batch is None:
            batch = _Batch(loaded, RunningBatch(loaded.model, loaded.tokenizer.pad_token_id), lane)
            self._batches.append(batch)
        return batch

    def _separate_long_rows(self, batch: _Batch) -> None:
        """Rows of the short lane that grew past ``long_row_tokens`` move to the long lane."""
        if batch.lane != "short":
            return
        long = [
            i
            for i, row in enumerate(batch.rows)
            if len(row.job.prompt_ids) + len(row.text.tokens) > self.long_row_tokens
        ]
        if not long:
            return
        target = self._batch_for(batch.loaded, "long")
        if len(long) == len(batch.rows) and not target.rows:  # all of them: the lanes swap, nothing is copied
            batch.lane, target.lane = "long", "short"
            return
        target.decoding.join(batch.decoding.split(long))
        target.rows.extend(batch.rows[i] for i in long)
        moved = set(long)
        batch.rows = [row for i, row in enumerate(batch.rows) if i not in moved]

    def _step(self, batch: _Batch) -> None:
        """One token for every row; rows that end or whose client left go, the rest take a decoding step."""
        if not batch.rows:
            return
        rows, decoding = batch.rows, batch.decoding
        try:
            device = decoding.logits.device
            tokens = choose_tokens_per_row(
                decoding.logits,
                temperatures=torch.tensor([row.request.temperature for row in rows], device=device),
                top_ps=torch.tensor([row.request.top_p for row in rows], dtype=torch.float64, device=device),
                generators=[row.generator for row in rows],
            )
            kept = [
                i for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)) if self._goes_on(row, token)
            ]
            decoding.keep(kept)
            batch.rows = [rows[i] for i in kept]
            self.step_rows.append(len(rows))
            self.steps += 1
            if kept:
                decoding.step(tokens[kept].to(decoding.mask.device))
                self._separate_long_rows(batch)
        except Exception as error:  # noqa: BLE001 - the batch's requests fail, the server lives
            logger.exception("tao serve: a decoding step failed")
            for row in batch.rows:
                row.job.fail(f"{type(error).__name__}: {error}")
            batch.rows, batch.decoding = [], RunningBatch(batch.loaded.model, batch.loaded.tokenizer.pad_token_id)

    def _goes_on(self, row: _Row, token: int) -> bool:
        if row.job.cancelled:
            return False
        try:
            return not row.take(token, row.job.loaded.eos_ids)
        except Exception as error:  # noqa: BLE001 - turning tokens into text failed for this request alone
            logger.exception("tao serve: a row failed")
            row.job.fail(f"{type(error).__name__}: {error}")
            return False

    def _fail_everything(self, message: str) -> None:
        with self._wake:
            jobs = list(self._queue)
            self._queue.clear()
        jobs += [row.job for batch in self._batches for row in batch.rows]
        if self._chunked is not None:
            jobs.append(self._chunked.job)
        for job in jobs:
            job.fail(message)


def _encode(loaded: LoadedModel, request: GenerationRequest) -> list[int]:
    try:
        return loaded.encode(request)
    except Exception as error:  # noqa: BLE001 - a prompt the tokenizer or the chat template refuses is the client's
        where = "messages" if request.messages is not None else "prompt"
        raise RequestRefused(
            400, f"{where}: cannot be tokenized: {type(error).__name__}: {error}", param=where
        ) from None


def _fit_to_context(request: GenerationRequest, prompt_tokens: int, context: int) -> GenerationRequest:
    """The request with ``max_tokens`` that fit the context, or a 400 like OpenAI's when it does not."""
    room = context - prompt_tokens
    if room < 1:
        raise RequestRefused(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens}. Shorten it.",
            param="messages" if request.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    if request.max_tokens <= room:
        return request
    if not request.max_tokens_asked:
        return dataclasses.replace(request, max_tokens=room)
    raise RequestRefused(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the prompt, {request.max_tokens} for "
        "the completion). Shorten the prompt or ask for fewer tokens.",
        param="max_tokens",
        code="context_length_exceeded",
    )


def _generator(job: _Job, index: int) -> torch.Generator:
    seed = job.request.seed
    value = secrets.randbits(64) if seed is None else (seed + index * SEED_STRIDE) % 2**64
    return torch.Generator(device=job.loaded.model.device).manual_seed(value)


async def _deltas(job: _Job, completion: Completion):
    """The job's text pieces as they come, collected into ``completion`` as well."""
    finished = 0
    try:
        while finished < len(completion.choices):
            event = await job.events.get()
            if isinstance(event, tuple):  # an error after the start
                raise EngineError(event[1])
            choice = completion.choices[event.index]
            choice.text += event.text
            if event.finish_reason is not None:
                choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
                finished += 1
            yield event
    finally:
        if finished < len(completion.choices):
            job.cancelled = True  # nobody reads the rest: its rows leave the batch at the next step

"""The local engine: the champion in this process (transformers), concurrent requests batched together.

One worker thread owns the model. It takes the first waiting request, gathers the others that
arrive within ``batch_window_s`` and share its sampling settings (up to ``max_batch_rows`` rows,
each request contributing ``n`` rows), and decodes them in one left-padded ``generate`` call.
Tokens reach each request as they are decoded (a streamer that sees the whole batch each step),
so streaming is real streaming, and a row that is done (EOS, its own ``max_tokens``, a stop
string) stops costing anything once every row of the batch is done.

A swap loads the new champion beside the current one and replaces it between batches: a batch
in flight finishes on the model it started with, so no request fails or mixes versions.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tao_pipeline.generation.base import eos_token_ids
from tao_pipeline.registry import ModelVersion
from tao_pipeline.registry.loading import load_model, load_tokenizer
from tao_pipeline.serving.engine import Choice, Completion, Delta, EngineError, GenerationRequest, Stream, SwapError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: object
    tokenizer: object
    eos_ids: frozenset[int]
    max_prompt_tokens: int

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            ids = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        return list(ids)[-self.max_prompt_tokens :]  # keep the end: that is what the answer continues


def load(version: ModelVersion, dtype: str, max_prompt_tokens: int, trust_remote_code: bool) -> LoadedModel:
    if not isinstance(version.path, Path):
        raise SwapError(f"{version.version_id} is a hub id ({version.path}); the local engine serves local weights")
    tokenizer = load_tokenizer(version.path, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_model(version.path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    eos = eos_token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    return LoadedModel(version.version_id, model, tokenizer, frozenset(eos), max_prompt_tokens)


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("start", version, prompt_tokens) | Delta | ("error", message)

    def send(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def sampling_key(self) -> tuple:
        return ("greedy",) if self.request.greedy else ("sample", self.request.temperature, self.request.top_p)


@dataclass
class _Row:
    """One choice of one request inside a batch, decoded incrementally."""

    job: _Job
    index: int
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already sent
    done: bool = False


class _BatchStreamer(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch and hands every row its new text."""

    def __init__(self, rows: list[_Row], loaded: LoadedModel):
        self.rows, self.loaded, self._prompt_seen = rows, loaded, False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if not row.done:
                self._step(row, token)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row, "length")

    def all_done(self) -> bool:
        return all(row.done for row in self.rows)

    def _step(self, row: _Row, token: int) -> None:
        if token in self.loaded.eos_ids:
            self._finish(row, "stop", counted=1)
            return
        row.tokens.append(token)
        text = self._text(row)
        stop_at = _first_stop(text, row.job.request.stop)
        if stop_at is not None:
            self._finish(row, "stop", text=text[:stop_at])
        elif len(row.tokens) >= row.max_tokens:
            self._finish(row, "length", text=text)
        elif not text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            hold = max((len(stop) - 1 for stop in row.job.request.stop), default=0)  # could begin a stop string
            self._send(row, text[: max(len(text) - hold, row.sent)])

    def _finish(self, row: _Row, reason: str, text: str | None = None, counted: int = 0) -> None:
        text = self._text(row) if text is None else text
        row.done = True
        final = text[row.sent :] if len(text) > row.sent else ""
        row.job.send(Delta(row.index, final, reason, len(row.tokens) + counted))

    def _send(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            row.job.send(Delta(row.index, text[row.sent :]))
            row.sent = len(text)

    def _text(self, row: _Row) -> str:
        return self.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True).lstrip()


class _StopWhenAllDone(StoppingCriteria):
    def __init__(self, streamer: _BatchStreamer):
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.streamer.all_done(), dtype=torch.bool, device=input_ids.device)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


class LocalEngine:
    name = "local"

    def __init__(
        self,
        *,
        dtype: str = "auto",
        max_prompt_tokens: int = 2048,
        max_batch_rows: int = 16,
        batch_window_s: float = 0.02,
        trust_remote_code: bool = False,
    ):
        self.dtype, self.max_prompt_tokens, self.trust_remote_code = dtype, max_prompt_tokens, trust_remote_code
        self.max_batch_rows, self.batch_window_s = max_batch_rows, batch_window_s
        self._loaded: LoadedModel | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: deque[_Job] = deque()  # taken from the queue but with other sampling settings
        self._worker = threading.Thread(target=self._work, name="tao-serve-local", daemon=True)
        self._seed = 0
        self.batch_rows: deque[int] = deque(maxlen=1000)  # rows per generate call, most recent last

    @property
    def version(self) -> str:
        return self._loaded.version if self._loaded else ""

    async def start(self, champion: ModelVersion) -> None:
        self._loaded = await asyncio.to_thread(self._load, champion)
        self._worker.start()

    async def switch_to(self, champion: ModelVersion) -> None:
        self._loaded = await asyncio.to_thread(self._load, champion)  # the next batch uses it

    def _load(self, champion: ModelVersion) -> LoadedModel:
        try:
            return load(champion, self.dtype, self.max_prompt_tokens, self.trust_remote_code)
        except SwapError:
            raise
        except Exception as error:  # noqa: BLE001 - any load failure keeps the current model serving
            raise SwapError(f"cannot load {champion.version_id} from {champion.path}: {error}") from error

    async def close(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._worker.join, 30)

    async def complete(self, request: GenerationRequest) -> Completion:
        stream = await self.stream(request)
        async for _ in stream.deltas:
            pass
        return stream.completion

    async def stream(self, request: GenerationRequest) -> Stream:
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        first = await job.events.get()
        if first[0] == "error":
            raise EngineError(first[1])
        _, version, prompt_tokens = first
        completion = Completion(version, [Choice() for _ in range(request.n)], prompt_tokens)
        return Stream(version, _deltas(job, completion), completion)

    # -- the worker thread -----------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            loaded = self._loaded  # one model for the whole batch, whatever a swap does meanwhile
            try:
                self._run(batch, loaded)
            except Exception as error:  # noqa: BLE001 - every request of the batch gets the error, the server lives
                logger.exception("tao serve: a batch failed")
                for job in batch:
                    job.send(("error", f"{type(error).__name__}: {error}"))

    def _next_batch(self) -> list[_Job] | None:
        """The first waiting job plus those with its sampling settings that arrive within the batch window."""
        first = self._waiting.popleft() if self._waiting else self._jobs.get()
        if first is None:
            return None
        batch, rows = [first], first.request.n
        deadline = time.monotonic() + self.batch_window_s
        while rows < self.max_batch_rows and (left := deadline - time.monotonic()) > 0:
            try:
                job = self._jobs.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)  # close after this batch
                break
            if job.sampling_key == first.sampling_key and rows + job.request.n <= self.max_batch_rows:
                batch.append(job)
                rows += job.request.n
            else:
                self._waiting.append(job)
        return batch

    @torch.inference_mode()
    def _run(self, batch: list[_Job], loaded: LoadedModel) -> None:
        encoded = [loaded.encode(job.request) for job in batch]
        for job, ids in zip(batch, encoded, strict=True):
            job.send(("start", loaded.version, len(ids)))
        rows = [_Row(job, i, job.request.max_tokens) for job in batch for i in range(job.request.n)]
        self.batch_rows.append(len(rows))
        expanded = [ids for job, ids in zip(batch, encoded, strict=True) for _ in range(job.request.n)]
        inputs = loaded.tokenizer.pad({"input_ids": expanded}, return_tensors="pt")
        streamer = _BatchStreamer(rows, loaded)
        request = batch[0].request
        sampling = (
            {"do_sample": False}
            if request.greedy
            else {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        )
        self._seed += 1
        torch.manual_seed(request.seed if request.seed is not None and len(batch) == 1 else self._seed)
        loaded.model.generate(
            input_ids=inputs["input_ids"].to(loaded.model.device),
            attention_mask=inputs["attention_mask"].to(loaded.model.device),
            max_new_tokens=max(row.max_tokens for row in rows),
            pad_token_id=loaded.tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenAllDone(streamer)]),
            use_cache=True,
            **sampling,
        )
        streamer.end()


async def _deltas(job: _Job, completion: Completion):
    """The job's text pieces as they come, collected into ``completion`` as well."""
    finished = 0
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

"""The Generator protocol and the table every backend returns."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import pandas as pd

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.common.threads import ThreadChoice
from tao_pipeline.data.conversation import fit_chat_to_tokens, row_chat

RESPONSE_COLUMNS = [
    "response_id",
    "prompt_id",
    "sample_index",
    "response",
    "model_version",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "sampling",
]


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    prompts: int = 0
    responses: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    history_turns_cut: int = 0  # earlier conversation turns cut to fit the prompt budget
    thread_seconds: dict[int, float] = field(default_factory=dict)  # torch threads -> seconds generated with them
    threads_why: str = ""  # why the latest batch got its threads

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def threads(self) -> int | None:
        """The torch thread count most of the generation time ran with (None: no torch on this machine's CPUs)."""
        return max(self.thread_seconds, key=self.thread_seconds.__getitem__) if self.thread_seconds else None

    def threads_metadata(self) -> dict[str, int | str]:
        """How many torch threads generated, and why: for an asset's metadata and the preflight's note."""
        if self.threads is None:
            return {}
        others = sorted(set(self.thread_seconds) - {self.threads})
        why = self.threads_why + (f"; some batches ran with {others} as the load changed" if others else "")
        return {"torch_threads": self.threads, "torch_threads_why": why}


class Generator(Protocol):
    """Turns prompts into sampled responses; one row per (prompt, sample)."""

    model_version: str

    def generate(self, prompts: pd.DataFrame, params: SamplingParams, progress: bool = True) -> pd.DataFrame:
        """``prompts`` has prompt_id, prompt, system; returns RESPONSE_COLUMNS."""
        ...


# Shared by every backend, so a response gets the same id and the same counts whichever engine sampled it.


def sampling_json(params: SamplingParams) -> str:
    """The sampling parameters as stored in the ``sampling`` column (and hashed into response ids)."""
    return json.dumps(params.describe(), sort_keys=True)


def response_id(prompt_id: str, model_version: str, sampling: str, sample_index: int) -> str:
    """Content hash of (prompt, model, sampling parameters, sample index): the same on every backend."""
    return content_hash(prompt_id, model_version, sampling, str(sample_index))


def eos_token_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> set[int]:
    """The tokens that end a response: the generation config's EOS id(s) plus the tokenizer's."""
    if isinstance(generation_eos, list):
        ids = set(generation_eos)
    else:
        ids = set() if generation_eos is None else {generation_eos}
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids


def split_at_stop(tokens: Sequence[int], stop_ids: Iterable[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether there was one (anything after it is padding)."""
    stops = set(stop_ids)
    token_list = list(tokens)
    stop_at = next((i for i, t in enumerate(token_list) if t in stops), None)
    return (token_list, False) if stop_at is None else (token_list[:stop_at], True)


def encode_chat_prompts(
    tokenizer, prompts: pd.DataFrame, max_prompt_tokens: int, stats: GenerationStats | None = None
) -> list[list[int]]:
    """Each row's conversation through the model's chat template, within ``max_prompt_tokens``.

    A conversation over the budget loses its oldest turns first (the system message and the last
    user turn stay; the cut is counted in ``stats``); only what is still too long is truncated.
    """
    encoded = []
    for row in prompts.itertuples():
        messages, cut = fit_chat_to_tokens(tokenizer, row_chat(row), max_prompt_tokens)
        if stats is not None:
            stats.history_turns_cut += cut
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            truncation=True,
            max_length=max_prompt_tokens,
            return_dict=False,
        )
        encoded.append(ids)
    return encoded


def response_row(
    *,
    prompt_id: str,
    model_version: str,
    sampling: str,
    sample_index: int,
    text: str,
    prompt_tokens: int,
    kept_tokens: int,
    stopped: bool,
) -> dict:
    """One RESPONSE_COLUMNS row. ``kept_tokens`` excludes the stop token; it counts as generated when ``stopped``."""
    return {
        "response_id": response_id(prompt_id, model_version, sampling, sample_index),
        "prompt_id": prompt_id,
        "sample_index": sample_index,
        "response": text,
        "model_version": model_version,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": kept_tokens + (1 if stopped else 0),
        "finish_reason": "stop" if stopped else "length",
        "sampling": sampling,
    }


def account(
    stats: GenerationStats, prompt_count: int, rows: list[dict], seconds: float, threads: ThreadChoice | None = None
) -> None:
    """Adds one generate call's prompts, rows, new tokens and time (and the torch threads it ran with) to ``stats``."""
    stats.prompts += prompt_count
    stats.responses += len(rows)
    stats.new_tokens += sum(r["completion_tokens"] for r in rows)
    stats.seconds += seconds
    if threads is not None:
        stats.thread_seconds[threads.threads] = stats.thread_seconds.get(threads.threads, 0.0) + seconds
        stats.threads_why = threads.reason

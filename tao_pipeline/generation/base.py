"""The Generator protocol and the table every backend returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import pandas as pd

RESPONSE_COLUMNS = [
    "response_id", "prompt_id", "sample_index", "response", "model_version",
    "prompt_tokens", "completion_tokens", "finish_reason", "sampling",
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

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class Generator(Protocol):
    """Turns prompts into sampled responses; one row per (prompt, sample)."""

    model_version: str

    def generate(self, prompts: pd.DataFrame, params: SamplingParams, progress: bool = True) -> pd.DataFrame:
        """``prompts`` has prompt_id, prompt, system; returns RESPONSE_COLUMNS."""
        ...

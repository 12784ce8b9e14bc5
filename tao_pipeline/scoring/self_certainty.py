"""Self-certainty scorer: a language model's own confidence in each response, for tasks with no answer to vote on.

Self-certainty (Kang et al. 2025, arXiv 2502.18581; used as the only reward by Intuitor, arXiv 2505.19590) is
the mean, over a response's tokens, of the KL divergence from the uniform distribution to the model's
next-token distribution at that position:

    certainty(response) = 1/|response| * sum_i KL(U || p(. | prompt, response_<i))
                        = 1/|response| * sum_i ( -log V - 1/V * sum_v log p_v )

A model that knows what to say next puts its mass on few tokens (a large KL); one that is guessing spreads it
(a small KL). Unlike the probability of the sampled tokens, it does not reward a response for repeating
itself, which is why best-of-N selection and RL from it hold up better than from log-likelihood.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tao_pipeline.common.threads import use_torch_threads
from tao_pipeline.data.conversation import build_chat
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.registry.loading import load_model, load_tokenizer
from tao_pipeline.scoring.base import (
    BatchSize,
    Failed,
    PromptContext,
    Score,
    TokenCount,
    forward_in_batches,
    group_minmax,
    scorer_options,
)

OPTION = "scoring.options.self_certainty"


class SelfCertaintyScorer:
    """Scores each response by the model's self-certainty over it, min-max scaled within the prompt's group
    (the most certain candidate 1, the least 0, all equal 0.5; an empty response 0).

    Needs ``model``: a local causal language model directory (safetensors), typically the base model the
    rounds tune, which makes the signal the policy's own confidence as in Intuitor. The text is the
    tokenizer's chat template over [system?, user prompt] with the assistant turn opened, followed by the
    response's tokens; without a template, "prompt\\n\\n" then the response.

    Options: ``model`` (required); ``batch_size`` (8); ``max_length`` (1024 tokens of prompt plus response;
    a longer response is scored on its first tokens); ``dtype`` ("auto", "bfloat16", "float32");
    ``trust_remote_code`` (False). The model loads once, on first use.
    """

    name = "self_certainty"

    @scorer_options
    def __init__(
        self,
        *,
        model: str | Path | None = None,
        batch_size: BatchSize = 8,
        max_length: TokenCount = 1024,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        if not model:
            raise ValueError(f"{OPTION}.model is required: a local causal language model directory")
        self.model_path = Path(model).expanduser()
        if not self.model_path.is_dir():
            raise ModelNotFoundError(f"{OPTION}.model: model directory {str(self.model_path)!r} does not exist")
        if dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"{OPTION}.dtype: expected 'auto', 'bfloat16' or 'float32', got {dtype!r}")
        self.batch_size, self.max_length = batch_size, max_length
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self._model = None
        self._tokenizer = None

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        if not responses:
            return []
        raw = self.certainties(context, responses)
        scaled = group_minmax([value for value in raw if value is not None])
        iterator = iter(scaled)
        return [0.0 if value is None else next(iterator) for value in raw]

    def certainties(self, context: PromptContext, responses: list[str]) -> list[float | Failed | None]:
        """Each response's raw self-certainty in nats (None for an empty response, Failed if it cannot be scored)."""
        self._load()
        encoded = [self._encode_or_fail(context, response) for response in responses]
        values: list = list(encoded)  # None (empty) and Failed stay; the encoded ones get their certainty
        ready = [i for i, item in enumerate(encoded) if isinstance(item, tuple)]
        certainties = forward_in_batches(
            self.name, [encoded[i] for i in ready], self.batch_size, self._forward, "certainty"
        )
        for index, value in zip(ready, certainties):
            values[index] = value
        return values

    def _load(self) -> None:
        if self._model is not None:
            return
        # Right padding keeps every real token at the position it has unbatched.
        self._tokenizer = load_tokenizer(
            self.model_path, trust_remote_code=self.trust_remote_code, padding_side="right"
        )
        try:
            self._model = load_model(self.model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        except ModelNotFoundError as error:
            raise ModelNotFoundError(f"{OPTION}.model: {error}") from error

    def _encode_or_fail(self, context: PromptContext, response: str) -> tuple[list[int], int] | Failed | None:
        """(prompt + response token ids, prompt length), None for an empty response, or Failed."""
        try:
            prompt_ids = self._prompt_ids(context)
            response_ids = self._tokenizer(response, add_special_tokens=False)["input_ids"]
        except Exception as error:  # noqa: BLE001 - one response's failure is recorded, not raised
            return Failed(f"{self.name}: cannot encode: {type(error).__name__}: {error}"[:300])
        if not response_ids:
            return None
        room = self.max_length - len(prompt_ids)
        if room < 1:
            return Failed(f"{self.name}: the prompt alone has {len(prompt_ids)} tokens, over max_length")
        return prompt_ids + response_ids[:room], len(prompt_ids)

    def _prompt_ids(self, context: PromptContext) -> list[int]:
        if self._tokenizer.chat_template:
            messages = build_chat(context.prompt, context.system, context.history)
            return list(
                self._tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        return self._tokenizer(f"{context.prompt}\n\n", add_special_tokens=True)["input_ids"]

    def _forward(self, batch: list[tuple[list[int], int]]) -> list[float]:
        use_torch_threads(None, "self_certainty")  # sized to the CPUs other processes leave free
        inputs = self._tokenizer.pad({"input_ids": [ids for ids, _ in batch]}, return_tensors="pt")
        device = self._model.device
        with torch.inference_mode():
            logits = self._model(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ).logits
        values = []
        for row, (ids, prompt_length) in enumerate(batch):
            # The distributions the response's tokens were drawn from: positions prompt_length - 1 .. len - 2.
            steps = logits[row, prompt_length - 1 : len(ids) - 1].float()
            values.append(float(kl_from_uniform(steps).mean()))
        return values


def kl_from_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || softmax(logits)) for each row: -log V - mean over the vocabulary of log p."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return -math.log(logits.shape[-1]) - log_probs.mean(dim=-1)

"""Reward-model scorer: a local sequence-classification reward model rates each (prompt, response)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tao_pipeline.common.threads import use_torch_threads
from tao_pipeline.data.conversation import build_chat
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.registry.loading import load_tokenizer, resolve_dtype
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

NORMALIZATIONS = ("sigmoid", "group_minmax")
OPTION = "scoring.options.reward_model"


class RewardModelScorer:
    """Scores each response with a local reward model (one scalar output per text).

    Needs ``model``: a local Hugging Face directory loadable with AutoModelForSequenceClassification
    (safetensors weights, num_labels=1) and its tokenizer. The text rated is the tokenizer's chat
    template over [system?, user prompt, assistant response], or "prompt\\n\\nresponse" when the
    tokenizer has no template, cut to ``max_length`` tokens.

    Options: ``model`` (required); ``batch_size`` (16); ``max_length`` (1024); ``normalize``:
    "sigmoid" (default, sigmoid of the reward) or "group_minmax" (min-max within the prompt's
    candidates, all equal -> 0.5); ``dtype`` ("auto", "bfloat16", "float32");
    ``trust_remote_code`` (False). The model loads once, on first use.
    """

    name = "reward_model"

    @scorer_options
    def __init__(
        self,
        *,
        model: str | Path | None = None,
        batch_size: BatchSize = 16,
        max_length: TokenCount = 1024,
        normalize: str = "sigmoid",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        self.model_path = _existing_model_dir(model)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"{OPTION}.normalize: expected one of {list(NORMALIZATIONS)}, got {normalize!r}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self._model = None
        self._tokenizer = None

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        if not responses:
            return []
        self._load()
        encoded = [self._encode_or_fail(context, response) for response in responses]
        rewards = self._rewards(encoded)
        if self.normalize == "group_minmax":
            return group_minmax(rewards)
        return [r if isinstance(r, Failed) else _sigmoid(r) for r in rewards]

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSequenceClassification

        # Right padding keeps the real tokens at the positions they have unbatched.
        tokenizer = load_tokenizer(self.model_path, trust_remote_code=self.trust_remote_code, padding_side="right")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(self.model_path),
                dtype=resolve_dtype(self.dtype),
                use_safetensors=True,
                trust_remote_code=self.trust_remote_code,
            )
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"{OPTION}.model: cannot load reward model {str(self.model_path)!r} (safetensors only): {error}"
            ) from error
        if model.config.num_labels != 1:
            raise ValueError(f"{OPTION}.model: a reward model has one output, this one has {model.config.num_labels}")
        if model.config.pad_token_id is None:  # the model finds each text's last token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model, self._tokenizer = model.to(device).eval(), tokenizer

    def _encode_or_fail(self, context: PromptContext, response: str) -> list[int] | Failed:
        try:
            return self._encode(context, response)
        except Exception as error:  # noqa: BLE001 - one response's failure is recorded, not raised
            return Failed(f"{self.name}: cannot encode: {type(error).__name__}: {error}"[:300])

    def _encode(self, context: PromptContext, response: str) -> list[int]:
        if self._tokenizer.chat_template:
            messages = [
                *build_chat(context.prompt, context.system, context.history),
                {"role": "assistant", "content": response},
            ]
            return list(
                self._tokenizer.apply_chat_template(
                    messages,
                    tokenize=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_dict=False,
                )
            )
        text = f"{context.prompt}\n\n{response}"
        return self._tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def _rewards(self, encoded: list[list[int] | Failed]) -> list[float | Failed]:
        rewards: list[float | Failed] = list(encoded)  # Failed entries stay as they are
        ready = [i for i, ids in enumerate(encoded) if not isinstance(ids, Failed)]
        values = forward_in_batches(self.name, [encoded[i] for i in ready], self.batch_size, self._forward, "reward")
        for index, value in zip(ready, values):
            rewards[index] = value
        return rewards

    def _forward(self, batch: list[list[int]]) -> list[float]:
        use_torch_threads(None, "reward_model")  # sized to the CPUs other processes leave free
        inputs = self._tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        with torch.inference_mode():
            logits = self._model(
                input_ids=inputs["input_ids"].to(self._model.device),
                attention_mask=inputs["attention_mask"].to(self._model.device),
            ).logits
        return logits[:, 0].float().cpu().tolist()


def _existing_model_dir(model: str | Path | None) -> Path:
    if not model:
        raise ValueError(f"{OPTION}.model is required: a local reward model directory")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"{OPTION}.model: reward model directory {str(path)!r} does not exist")
    return path


def _sigmoid(value: float) -> float:
    return 0.5 * (1.0 + math.tanh(value / 2.0))  # equals 1 / (1 + e^-x) without overflowing

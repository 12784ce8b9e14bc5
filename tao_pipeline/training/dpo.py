"""DPO (TRL's DPOTrainer) on a round's preference pairs: chosen = best-scored candidate, rejected = worst."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tao_pipeline.data.conversation import HistoryCuts, row_chat
from tao_pipeline.settings import TrainingSettings
from tao_pipeline.training.callbacks import LossProgressBar
from tao_pipeline.training.trainer import TrainingResult, fit_and_save, trainer_arguments

if TYPE_CHECKING:
    from transformers import TrainerCallback


def preference_dataset(
    pairs: pd.DataFrame, tokenizer=None, max_length: int | None = None, cuts: HistoryCuts | None = None
):
    """Pairs -> a conversational preference dataset, so TRL applies the model's own chat template.

    With a tokenizer, a conversation whose prompt and longer answer exceed ``max_length`` tokens
    loses its oldest turns first, counted in ``cuts``.
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    fit = _history_fitter(tokenizer, cuts if cuts is not None else HistoryCuts())
    return Dataset.from_list(
        [
            {
                "prompt": fit(row_chat(row), max_length, row.chosen, row.rejected),
                "chosen": [{"role": "assistant", "content": row.chosen}],
                "rejected": [{"role": "assistant", "content": row.rejected}],
            }
            for row in pairs.itertuples()
        ]
    )


def _history_fitter(tokenizer, cuts: HistoryCuts):
    """fit(messages, max_length, *answers): the conversation cut from the front so that it and its
    longest answer fit ``max_length`` tokens (at least half of them stay for the prompt)."""

    def fit(messages: list[dict[str, str]], max_length: int | None, *answers: str) -> list[dict[str, str]]:
        if tokenizer is None or max_length is None or len(messages) <= 2:
            return messages
        answer_tokens = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers)
        return cuts.fit(tokenizer, messages, max(max_length - answer_tokens, max_length // 2))

    return fit


def dpo_config(settings: TrainingSettings, output_dir: str):
    """TRL's DPOConfig: tao's defaults, ``training.dpo_args``, then tao's own settings."""
    from trl import DPOConfig

    return DPOConfig(
        **trainer_arguments(
            settings, output_dir, defaults={}, options=settings.dpo_args, from_settings=dpo_settings_arguments(settings)
        )
    )


def dpo_settings_arguments(settings: TrainingSettings) -> dict:
    """The DPO options tao's own settings set (settings.trl_options.FROM_SETTINGS['dpo'], with the shared ones)."""
    return {
        "beta": settings.beta,
        "max_length": settings.max_length,
        "precompute_ref_log_probs": settings.precompute_ref_log_probs,
    }


def train_dpo(
    parent_path: Path | str,
    pairs: pd.DataFrame,
    settings: TrainingSettings,
    output_dir: Path,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingResult:
    """Tune the parent model on the pairs and save merged weights (+ adapter) into output_dir.

    With LoRA the reference model is the parent itself (the adapter switched off); with
    ``settings.precompute_ref_log_probs`` its log-probs are computed in one pass before the first step.
    """
    from trl import DPOTrainer

    if pairs.empty:
        raise ValueError("no preference pairs to train on: lower pairs.min_margin or add prompts")
    cuts = HistoryCuts()
    result = fit_and_save(
        lambda model, tokenizer, peft_config, scratch: DPOTrainer(
            model=model,
            args=dpo_config(settings, scratch),
            train_dataset=preference_dataset(pairs, tokenizer, settings.max_length, cuts),
            processing_class=tokenizer,
            peft_config=peft_config,
        ),
        parent_path,
        settings,
        output_dir,
        bar=LossProgressBar() if progress else None,
        trust_remote_code=trust_remote_code,
        bf16_frozen_weights=settings.bf16_frozen_weights,
        score_completions_only=settings.score_completions_only,
        callbacks=callbacks,
    )
    result.history_turns_cut = cuts.turns
    return result

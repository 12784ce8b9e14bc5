"""Supervised fine-tuning (TRL's SFTTrainer) on given answers: the labeled alternative TAO is measured against.

The pipeline itself never trains on labels (it has none): ``bench/`` uses this to tune the same base model,
with the same LoRA and budget as a TAO round, on the gold answers of the same train prompts, so that a user
sees what TAO's label-free tuning gives against the tuning they would otherwise pay annotators for.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tao_pipeline.data.conversation import row_chat
from tao_pipeline.settings import TrainingSettings
from tao_pipeline.training.callbacks import LossProgressBar
from tao_pipeline.training.trainer import TrainingResult, fit_and_save, trainer_arguments


def completion_dataset(examples: pd.DataFrame):
    """Prompt rows with an ``answer`` column -> a conversational prompt-completion dataset (the model's own
    chat template; the loss is on the answer only)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(
        [
            {"prompt": row_chat(row), "completion": [{"role": "assistant", "content": str(row.answer)}]}
            for row in examples.itertuples()
        ]
    )


def sft_config(settings: TrainingSettings, output_dir: str):
    """TRL's SFTConfig with the budget, learning rate, precision and seed of a TAO round's settings."""
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(
            settings,
            output_dir,
            defaults={},
            options={},
            from_settings={"max_length": settings.max_length, "completion_only_loss": True, "packing": False},
        )
    )


def train_sft(
    parent_path: Path | str,
    examples: pd.DataFrame,
    settings: TrainingSettings,
    output_dir: Path,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> TrainingResult:
    """Tune the parent on ``examples`` (prompt rows and their ``answer``) and save merged weights into output_dir."""
    from trl import SFTTrainer

    if examples.empty:
        raise ValueError("no examples to fine-tune on")
    return fit_and_save(
        lambda model, tokenizer, peft_config, scratch: SFTTrainer(
            model=model,
            args=sft_config(settings, scratch),
            train_dataset=completion_dataset(examples),
            processing_class=tokenizer,
            peft_config=peft_config,
        ),
        parent_path,
        settings,
        output_dir,
        bar=LossProgressBar("sft") if progress else None,
        trust_remote_code=trust_remote_code,
    )

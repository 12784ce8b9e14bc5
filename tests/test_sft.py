"""The labeled arm's trainer (TRL SFT with the round's LoRA and budget), on the tiny llama."""

from __future__ import annotations

import pandas as pd
import pytest

from tao_pipeline.training.sft import completion_dataset, sft_config, train_sft
from tests.test_training import changed_tensors, settings


def examples(count: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": [f"What is {i} + 1? Reply with just the number." for i in range(count)],
            "system": [None] * count,
            "answer": [str(i + 1) for i in range(count)],
        }
    )


def test_sft_tunes_on_the_answers_only_with_the_rounds_lora_and_budget(tiny_model_dir, tmp_path):
    config = sft_config(settings(), str(tmp_path / "scratch"))
    assert (config.max_steps, config.learning_rate, config.bf16, config.max_length) == (2, 1e-3, False, 64)
    assert config.completion_only_loss and not config.packing and not config.gradient_checkpointing
    first = completion_dataset(examples(1))[0]
    assert first["prompt"][-1] == {"role": "user", "content": "What is 0 + 1? Reply with just the number."}
    assert first["completion"] == [{"role": "assistant", "content": "1"}]

    out = tmp_path / "sft"
    result = train_sft(tiny_model_dir, examples(), settings(), out, progress=False)
    assert result.steps == 2 and result.log_history and "loss" in result.log_history[0]
    changed = changed_tensors(tiny_model_dir, out)
    assert changed and all(name.endswith("proj.weight") for name in changed)  # LoRA, merged


def test_sft_with_nothing_to_learn_says_so(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        train_sft(tiny_model_dir, examples(0), settings(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

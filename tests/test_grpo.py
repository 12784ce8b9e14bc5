"""tao_pipeline.grpo: the scorer as a GRPO reward, and GRPO + LoRA on the tiny llama."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from tao_pipeline.data.prompts import PROMPT_COLUMNS
from tao_pipeline.scoring import build_scorer
from tao_pipeline.settings import GrpoSettings, ScoringSettings, TrainingSettings
from tao_pipeline.training import ADAPTER_DIR, TRAINING_LOG_FILE
from tao_pipeline.training.grpo import prompt_dataset, scorer_reward_function, train_grpo
from tests.helpers import build_tiny_model
from tests.test_trl_args import SeenByTheTrainer


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("grpo-parent"))


def make_prompts(count: int = 4, constraints: str | None = None) -> pd.DataFrame:
    rows = [
        {
            "prompt_id": f"p{i}",
            "prompt": f"Name colour number {i}. Answer with one word.",
            "system": "You are a concise assistant." if i % 2 else None,
            "task": "short_answer",
            "constraints": constraints,
            "split": "train",
            "log_ids": f"log-{i}",
            "source_files": "logs.jsonl",
        }
        for i in range(count)
    ]
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS)


def length_scorer():
    return build_scorer(
        ScoringSettings(
            scorers={"default": {"length_limit": 1.0}},
            options={"length_limit": {"max_words": 3}},
            extractors={"default": "short_phrase"},
        )
    )


def consensus_scorer():
    return build_scorer(
        ScoringSettings(scorers={"default": {"self_consistency": 1.0}}, extractors={"default": "short_phrase"})
    )


def training_settings(**kwargs) -> TrainingSettings:
    values = {"max_steps": 2, "batch_size": 4, "bf16": False, "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8}
    return TrainingSettings(**{**values, **kwargs})


def as_messages(texts: list[str]) -> list[list[dict]]:
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_reward_groups_completions_by_prompt_and_keeps_their_order():
    reward = scorer_reward_function(consensus_scorer(), make_prompts(2))
    # p0's siblings agree on "blue" 2 of 3, p1's on "red" 2 of 3; scored together they would not.
    texts = ["Blue.", "Red.", "Blue.", "Green.", "Green.", "Red."]
    ids = ["p0", "p1", "p0", "p1", "p0", "p1"]
    rewards = reward(prompts=[[]] * 6, completions=as_messages(texts), completion_ids=[[]] * 6, prompt_id=ids)
    assert rewards == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 2 / 3])


def test_reward_accepts_standard_completions_and_gives_failed_scores_no_reward():
    prompts = pd.concat([make_prompts(1), make_prompts(2, '{"max_words": -1}').iloc[[1]]])
    reward = scorer_reward_function(length_scorer(), prompts)
    texts = ["Blue.", "one two three four five six", "Blue.", "Red."]
    rewards = reward(prompts=["q"] * 4, completions=texts, prompt_id=["p0", "p0", "p1", "p1"], trainer_state=None)
    assert rewards == [1.0, 0.0, None, None]  # p1's constraint is invalid: Failed, so no reward (not 0)


def test_prompt_dataset_is_conversational_with_prompt_ids():
    data = prompt_dataset(make_prompts(2))
    assert data[0] == {
        "prompt": [{"role": "user", "content": "Name colour number 0. Answer with one word."}],
        "prompt_id": "p0",
    }
    assert data[1]["prompt"][0] == {"role": "system", "content": "You are a concise assistant."}


def test_train_grpo_with_lora_saves_a_changed_merged_model(parent_dir, tmp_path):
    out = tmp_path / "child"
    options = {"loss_type": "grpo", "epsilon": 0.3, "weight_decay": 0.2}  # training.grpo_args reach the trainer
    settings = training_settings(grpo=GrpoSettings(num_generations=2, max_completion_length=16), grpo_args=options)
    seen = SeenByTheTrainer()
    result = train_grpo(parent_dir, make_prompts(4), length_scorer(), settings, out, progress=False, callbacks=[seen])

    assert (seen.args.loss_type, seen.args.epsilon, seen.args.num_generations) == ("grpo", 0.3, 2)
    assert 0.2 in seen.weight_decays
    assert result.steps == 2
    assert len(result.series("reward")) == 2 and len(result.series("reward_std")) == 2
    assert all(0.0 <= value <= 1.0 for value in result.series("reward"))
    assert (out / "model.safetensors").is_file()
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert json.loads((out / TRAINING_LOG_FILE).read_text()) == result.log_history
    parent = load_file(str(parent_dir / "model.safetensors"))
    child = load_file(str(out / "model.safetensors"))
    assert set(child) == set(parent)
    assert any(not child[name].equal(parent[name]) for name in child)


def test_batch_must_hold_whole_prompt_groups(parent_dir, tmp_path):
    with pytest.raises(ValueError, match=r"training\.batch_size.*training\.grpo\.num_generations"):
        settings = training_settings(batch_size=3, grpo=GrpoSettings(num_generations=2))
        train_grpo(parent_dir, make_prompts(4), length_scorer(), settings, tmp_path, progress=False)


def test_empty_prompts_are_refused(parent_dir, tmp_path):
    with pytest.raises(ValueError, match="no prompts to train on"):
        train_grpo(parent_dir, make_prompts(0), length_scorer(), training_settings(), tmp_path, progress=False)

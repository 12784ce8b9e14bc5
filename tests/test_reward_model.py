"""tao_pipeline.scoring.reward_model on a tiny random LlamaForSequenceClassification (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tao_pipeline.registry import ModelNotFoundError
from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.reward_model import RewardModelScorer
from tao_pipeline.settings import ScoringSettings
from tests.helpers import build_tiny_model

CONTEXT = PromptContext("What is 2 + 3? Reply with just the number.", "arithmetic", "You are a concise assistant.")
RESPONSES = ["5", "The answer is 5.", "Blue", "5 5 5 5 5 5 5 5 5 5 5 5 5 5", "", "Paris is the capital of France."]


def build_tiny_reward_model(directory: Path, *, chat_template: bool = True) -> Path:
    """The tiny llama's tokenizer and config, with a randomly initialised one-output classification head."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    source = build_tiny_model(directory / "source")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig.from_pretrained(source, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    target = directory / "reward"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward"))


def scorer(model_dir: Path, **options) -> RewardModelScorer:
    return RewardModelScorer(model=str(model_dir), dtype="float32", **options)


def test_scores_are_in_unit_interval_and_deterministic(reward_model_dir):
    first = scorer(reward_model_dir).score_group(CONTEXT, RESPONSES)
    again = scorer(reward_model_dir).score_group(CONTEXT, RESPONSES)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in first)
    assert first == again
    assert len(set(first)) > 1  # distinct texts get distinct rewards


def test_batched_scores_equal_one_by_one(reward_model_dir):
    batched = scorer(reward_model_dir, batch_size=4).score_group(CONTEXT, RESPONSES)
    one_model = scorer(reward_model_dir, batch_size=1)
    single = [one_model.score_group(CONTEXT, [response])[0] for response in RESPONSES]
    assert batched == pytest.approx(single, abs=1e-5)


def test_group_minmax_spans_the_unit_interval(reward_model_dir):
    minmax = scorer(reward_model_dir, normalize="group_minmax")
    scores = minmax.score_group(CONTEXT, RESPONSES)
    assert min(scores) == 0.0 and max(scores) == 1.0
    sigmoid = scorer(reward_model_dir).score_group(CONTEXT, RESPONSES)
    assert sorted(range(len(scores)), key=scores.__getitem__) == sorted(range(len(sigmoid)), key=sigmoid.__getitem__)
    assert minmax.score_group(CONTEXT, ["same", "same", "same"]) == [0.5, 0.5, 0.5]


def test_prompt_and_system_change_the_reward(reward_model_dir):
    model = scorer(reward_model_dir)
    with_system = model.score_group(CONTEXT, ["5"])[0]
    without_system = model.score_group(PromptContext(CONTEXT.prompt, "arithmetic"), ["5"])[0]
    other_prompt = model.score_group(PromptContext("Name a colour.", "arithmetic"), ["5"])[0]
    assert len({with_system, without_system, other_prompt}) == 3


def test_tokenizer_without_chat_template_scores_prompt_then_response(tmp_path):
    model_dir = build_tiny_reward_model(tmp_path, chat_template=False)
    model = scorer(model_dir, max_length=8)
    scores = model.score_group(CONTEXT, RESPONSES)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert model._encode(CONTEXT, "5") == model._tokenizer(f"{CONTEXT.prompt}\n\n5")["input_ids"][:8]


def test_empty_group_and_built_from_settings(reward_model_dir):
    settings = ScoringSettings(
        scorers={"default": {"reward_model": 1.0}},
        options={"reward_model": {"model": str(reward_model_dir), "dtype": "float32", "normalize": "group_minmax"}},
    )
    built = build_named_scorer("reward_model", settings, cache_dir=None)
    assert isinstance(built, RewardModelScorer) and built.normalize == "group_minmax"
    assert built.score_group(CONTEXT, []) == []
    assert not any(isinstance(s, Failed) for s in built.score_group(CONTEXT, RESPONSES[:2]))


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"scoring\.options\.reward_model\.model"):
        RewardModelScorer(model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match=r"scoring\.options\.reward_model\.model is required"):
        RewardModelScorer()
    with pytest.raises(ValueError, match="normalize"):
        RewardModelScorer(model=str(tmp_path), normalize="softmax")

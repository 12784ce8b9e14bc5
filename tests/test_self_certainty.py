"""The self-certainty scorer: the model's own confidence (KL from uniform of its next-token distributions,
averaged over the response), computed as defined, batched as one by one, scaled within the group."""

from __future__ import annotations

import math

import pytest
import torch

from tao_pipeline.scoring import ScorerOptionsError, build_scorer
from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.self_certainty import SelfCertaintyScorer
from tao_pipeline.settings import ScoringSettings

CONTEXT = PromptContext(prompt="What is 2 + 3? Reply with just the number.", task="arithmetic", system="Be brief.")
RESPONSES = ["5", "The answer is 5.", "five, I think, or maybe six", "5 5 5 5 5 5 5 5"]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir) -> SelfCertaintyScorer:
    loaded = SelfCertaintyScorer(model=str(tiny_model_dir), dtype="float32", batch_size=3)
    loaded.certainties(CONTEXT, ["5"])  # loads the model and tokenizer the checks below read
    return loaded


def definition(scorer: SelfCertaintyScorer, context: PromptContext, response: str) -> float:
    """Self-certainty straight from its definition, one response alone, with torch's own KL divergence."""
    tokenizer, model = scorer._tokenizer, scorer._model
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": context.system}, {"role": "user", "content": context.prompt}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + answer])).logits[0].float()
    total = 0.0
    for i in range(len(answer)):  # the distribution the i-th response token was drawn from
        log_p = torch.log_softmax(logits[len(prompt) - 1 + i], dim=-1)
        uniform = torch.full_like(log_p, 1.0 / log_p.numel())
        total += float(torch.nn.functional.kl_div(log_p, uniform, reduction="sum"))  # KL(uniform || p)
    return total / len(answer)


def test_each_certainty_is_the_mean_kl_from_uniform_over_the_response_tokens(scorer):
    values = scorer.certainties(CONTEXT, RESPONSES)
    for response, value in zip(RESPONSES, values):
        assert value == pytest.approx(definition(scorer, CONTEXT, response), rel=1e-4, abs=1e-5)
        assert value > 0  # a distribution that is not uniform is some way from it


def test_batched_certainties_equal_one_by_one_and_the_prompt_matters(scorer):
    batched = scorer.certainties(CONTEXT, RESPONSES)  # batches of 3 and 1, right-padded
    alone = [scorer.certainties(CONTEXT, [response])[0] for response in RESPONSES]
    assert batched == pytest.approx(alone, rel=1e-4)
    other = PromptContext(prompt="Name a colour.", task="short_answer")
    assert scorer.certainties(other, RESPONSES) != pytest.approx(batched, rel=1e-4)


def test_scores_span_the_group_most_certain_one_least_certain_zero(scorer):
    values = scorer.certainties(CONTEXT, RESPONSES)
    scores = scorer.score_group(CONTEXT, RESPONSES)
    assert scores[values.index(max(values))] == 1.0 and scores[values.index(min(values))] == 0.0
    assert all(0.0 <= score <= 1.0 for score in scores)
    order = sorted(range(len(RESPONSES)), key=values.__getitem__)
    assert order == sorted(range(len(RESPONSES)), key=scores.__getitem__)
    assert scorer.score_group(CONTEXT, ["5", "5"]) == [0.5, 0.5]  # nothing to tell apart
    assert scorer.score_group(CONTEXT, []) == []


def test_an_empty_response_scores_zero_and_an_overlong_prompt_fails_alone(scorer, tiny_model_dir):
    prompt_tokens = len(scorer._prompt_ids(CONTEXT))
    short = SelfCertaintyScorer(model=str(tiny_model_dir), dtype="float32", max_length=prompt_tokens + 3)
    scores = short.score_group(CONTEXT, ["", "5", "The answer is 5."])
    assert scores[0] == 0.0 and sorted(scores[1:]) == [0.0, 1.0]
    long_prompt = PromptContext(prompt="word " * 200, task="default")
    [failed] = short.score_group(long_prompt, ["5"])
    assert isinstance(failed, Failed) and "over max_length" in failed.reason
    [long_answer] = short.certainties(CONTEXT, ["5 " * 200])  # scored on its first tokens, not refused
    assert isinstance(long_answer, float) and math.isfinite(long_answer)


def test_built_from_settings_and_a_missing_model_is_one_line(tiny_model_dir, tmp_path):
    settings = ScoringSettings(
        scorers={"default": {"self_certainty": 1.0}},
        options={"self_certainty": {"model": str(tiny_model_dir), "dtype": "float32"}},
    )
    scorer = build_scorer(settings)
    rows = scorer.score_group(CONTEXT, RESPONSES)
    assert len(rows) == len(RESPONSES)
    for options, named in [
        ({}, "scoring.options.self_certainty.model is required"),
        ({"model": str(tmp_path / "nowhere")}, "does not exist"),
        ({"model": str(tiny_model_dir), "dtype": "fp8"}, "scoring.options.self_certainty.dtype"),
        ({"model": str(tiny_model_dir), "batch_size": 0}, "scoring.options.self_certainty.batch_size"),
    ]:
        bad = ScoringSettings(scorers={"default": {"self_certainty": 1.0}}, options={"self_certainty": options})
        with pytest.raises(ScorerOptionsError, match=named.replace(".", r"\.")):
            build_scorer(bad)

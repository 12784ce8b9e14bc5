"""A failure is not a signal: a response a scorer could not score is never paired, never best-of-k,
never a win or a loss, and a round whose scorer is mostly down stops before training."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tao_pipeline.evaluation.evaluate import _outcome
from tao_pipeline.scoring import ScoringOutage, check_unscored_share, score_candidates
from tao_pipeline.settings import ScoringSettings, SettingsError, load_settings
from tao_pipeline.training.pairs import build_pairs
from tests.judge_server import FakeJudgeServer, chat_completion

PROMPTS = pd.DataFrame(
    {
        "prompt_id": [f"p{i}" for i in range(4)],
        "prompt": [f"Name colour number {i}." for i in range(4)],
        "system": [None] * 4,
        "task": ["chat"] * 4,
    }
)
CANDIDATES = pd.DataFrame(
    {
        "response_id": [f"p{i}-{j}" for i in range(4) for j in range(3)],
        "prompt_id": [f"p{i}" for i in range(4) for j in range(3)],
        "response": [f"answer {j} to {i}" for i in range(4) for j in range(3)],
    }
)


def judge_settings(server: FakeJudgeServer, **extra) -> ScoringSettings:
    return ScoringSettings(
        scorers={"default": {"self_consistency": 1.0}, "chat": {"llm_judge": 1.0}},
        options={
            "llm_judge": {
                "backend": "openai",
                "base_url": server.base_url,
                "model": "judge-test",
                "timeout_s": 5.0,
                "max_retries": 0,
            }
        },
        **extra,
    )


def down_for(prompt_ids: set[str]):
    """A judge that answers 8/10 except for the prompts in ``prompt_ids``, where it returns a 503."""

    def reply(body, headers):
        text = json.dumps(body)
        if any(f"number {pid[1:]}." in text for pid in prompt_ids):
            return 503, '{"error": "overloaded"}'
        score = 9 if "answer 0" in text else 2  # the first candidate of each prompt is the judge's favourite
        return 200, chat_completion(f"Score: {score}")

    return reply


@pytest.fixture
def judge():
    servers = []

    def start(reply) -> FakeJudgeServer:
        servers.append(FakeJudgeServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_judge_outage_on_some_prompts_never_becomes_a_pair(judge, tmp_path):
    server = judge(down_for({"p1"}))
    scores, cache = score_candidates(CANDIDATES, PROMPTS, judge_settings(server), tmp_path)
    unscored = scores[scores["score"].isna()]
    assert set(unscored["prompt_id"]) == {"p1"} and unscored["failures"].str.contains("503").all()
    pairs, stats = build_pairs(PROMPTS, CANDIDATES, scores, min_margin=0.1)
    assert sorted(pairs["prompt_id"]) == ["p0", "p2", "p3"]  # p1 gives no pair: unknown is not 0
    assert stats.unscored_responses == 3 and stats.dropped["unscored"] == 1
    assert set(pairs["chosen_response_id"].str[-2:]) == {"-0"}  # the judge's real preference, only
    # The failed prompt is not cached: when the judge is back, a rerun scores it.
    server.reply = down_for(set())
    again, cache = score_candidates(CANDIDATES, PROMPTS, judge_settings(server), tmp_path)
    assert again["score"].notna().all() and cache.cached_groups == 3


def test_a_round_whose_judge_is_down_stops_before_training(judge, tmp_path):
    server = judge(down_for({"p0", "p1", "p2"}))
    with pytest.raises(ScoringOutage, match=r"9 of 12 responses have no score .*503.*max_unscored_share=0.5"):
        score_candidates(CANDIDATES, PROMPTS, judge_settings(server), tmp_path)
    settings = judge_settings(server, max_unscored_share=0.8)  # a user who accepts more
    scores, _ = score_candidates(CANDIDATES, PROMPTS, settings, tmp_path)
    assert scores["score"].isna().sum() == 9


def test_check_unscored_share_at_the_boundary():
    scores = pd.DataFrame({"score": [1.0, math.nan], "failures": [None, json.dumps({"a": "down"})]})
    check_unscored_share(scores, 0.5)  # exactly half: goes on
    with pytest.raises(ScoringOutage, match="most common: down"):
        check_unscored_share(scores, 0.49)


def test_unknown_scores_are_neither_a_win_nor_a_loss():
    assert _outcome(math.nan, 0.5) is None and _outcome(0.5, math.nan) is None
    assert _outcome(0.7, 0.5) == "win" and _outcome(0.5, 0.5) == "tie" and _outcome(0.2, 0.5) == "loss"


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_at_load(weight):
    with pytest.raises(SettingsError, match=r"scoring\.scorers\.default\.self_consistency'?: .*finite") as refused:
        load_settings(None, [f"scoring.scorers.default.self_consistency={weight}"])
    assert "\n" not in str(refused.value)

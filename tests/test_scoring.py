"""tao_pipeline.scoring: extractors, self-consistency, verifiers, the composite and score_responses."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.scoring import SCORE_COLUMNS, CompositeScorer, PromptContext, build_scorer, score_responses
from tao_pipeline.scoring.base import Failed
from tao_pipeline.scoring.composite import TaskRecipe
from tao_pipeline.scoring.extractors import (
    answer_matches,
    first_line_number,
    get_extractor,
    last_number,
    normalize_number,
    short_phrase,
)
from tao_pipeline.scoring.self_consistency import SelfConsistencyScorer
from tao_pipeline.scoring.verifiers import ConciseFormatVerifier, NumberFormatVerifier
from tao_pipeline.settings import ScoringSettings, load_settings

# -- extractors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The total is 1,000.", "1000"),
        ("1000.0", "1000"),
        ("1000", "1000"),
        ("It is 2.5 kg", "2.5"),
        ("First 3, then 4, finally -7.", "-7"),
        ("7 + 5 = 12", "12"),
        ("Costs $1,234,567 in all", "1234567"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(response, expected):
    assert last_number(response) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1234.5678", "1234.5678"),
        ("3.14159265", "3.14159265"),
        ("1,234,567.25", "1234567.25"),
    ],
)
def test_normalize_number_keeps_real_decimals_exactly(text, expected):
    # Distinct answers must stay distinct: rounding to 6 significant digits makes 1234.57 "equal" 1234.5678.
    assert normalize_number(text) == expected
    assert not answer_matches(last_number("The answer is 1234.57"), ["1234.5678"], last_number)


def test_normalize_number_rejects_non_numbers():
    assert normalize_number("abc") is None
    assert normalize_number("12") == "12"
    assert normalize_number("-3.0") == "-3"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("7 + 5 = 12\nWait, it is 13.", "12"),
        ("\n\n  42  \nlater 7", "42"),
        ("The answer:\n12", None),
        ("", None),
    ],
)
def test_first_line_number(response, expected):
    assert first_line_number(response) == expected


@pytest.mark.parametrize(
    "response, prompt, expected",
    [
        ("The chemical symbol for sodium is **Na**.", "What is the chemical symbol for sodium?", "na"),
        ("PARIS!", "What is the capital of France?", "paris"),
        ("Paris.", "What is the capital of France? Answer with one word.", "paris"),
        ("The capital of France is Paris. It is lovely in spring.", "What is the capital of France?", "paris"),
        ("It is the Pacific Ocean.", "Which is the largest ocean?", "pacific"),
        ("The answer is: 42", "What?", "42"),
        ("Blue\nRed", "Name a colour.", "blue"),
        ("The opposite of hot is cold", "What is the opposite of hot?", "cold"),
        ("the the the", "x", None),
        ("", "x", None),
    ],
)
def test_short_phrase(response, prompt, expected):
    assert short_phrase(response, prompt) == expected


def test_short_phrase_keeps_the_last_words_of_long_tails():
    assert short_phrase("alpha beta gamma delta epsilon", "") == "gamma delta epsilon"
    assert short_phrase("alpha beta gamma delta", "", max_words=1) == "delta"


def test_get_extractor():
    assert get_extractor("last_number") is last_number
    assert get_extractor("short_phrase") is short_phrase
    with pytest.raises(ValueError, match="unknown answer extractor 'nope'"):
        get_extractor("nope")


def test_answer_matches():
    prompt = "What is the capital of Mexico?"
    extracted = short_phrase("It is Mexico City.", prompt)
    assert answer_matches(extracted, ["Mexico City"], short_phrase, prompt)
    assert answer_matches(short_phrase("Beijing", "Capital of China?"), ["Peking", "Beijing"], short_phrase)
    assert not answer_matches(short_phrase("Shanghai", "Capital of China?"), ["Beijing"], short_phrase)
    assert answer_matches(last_number("So 1,000 in total"), ["1000"], last_number)
    assert answer_matches("12", ["12.0"], last_number)
    assert not answer_matches("1", ["12"], last_number)  # whole tokens only, never substrings
    assert not answer_matches("12", ["123"], last_number)
    assert not answer_matches(None, ["12"], last_number)


# -- self-consistency -------------------------------------------------------------------


def consistency(min_agreement=0.0):
    return SelfConsistencyScorer({"arithmetic": last_number, "default": short_phrase}, min_agreement)


def test_self_consistency_vote_shares():
    context = PromptContext("What is 2 + 3?", "arithmetic")
    responses = ["5", "It is 5.", "6", "no idea", "2 + 3 = 5.0"]
    assert consistency().score_group(context, responses) == [0.6, 0.6, 0.2, 0.0, 0.6]
    assert consistency().answers(context, responses) == ["5", "5", "6", None, "5"]


def test_self_consistency_routes_by_task_with_default():
    responses = ["Paris", "paris.", "Lyon 2"]
    # 'short_answer' is not configured: the default extractor (short_phrase) votes.
    scores = consistency().score_group(PromptContext("Capital of France?", "short_answer"), responses)
    assert scores == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    # arithmetic: last_number votes -> only 'Lyon 2' has an answer.
    scores = consistency().score_group(PromptContext("Capital of France?", "arithmetic"), responses)
    assert scores == pytest.approx([0.0, 0.0, 1 / 3])


def test_self_consistency_min_agreement():
    context = PromptContext("What is 2 + 3?", "arithmetic")
    responses = ["1", "2", "3", "3"]  # top share 0.5
    assert consistency(0.5).score_group(context, responses) == [0.25, 0.25, 0.5, 0.5]
    assert consistency(0.51).score_group(context, responses) == [0.0] * 4
    assert consistency().score_group(context, ["none", "at all"]) == [0.0, 0.0]


# -- verifiers --------------------------------------------------------------------------


def test_concise_format_verifier():
    verifier = ConciseFormatVerifier(max_words=4)
    assert verifier.score_one("Paris") == 1.0
    assert verifier.score_one("one two three four") == 1.0
    assert verifier.score_one("one two three four five six seven eight") == 0.5
    assert verifier.score_one("Paris\nis the capital") == 0.5  # two lines halve the score
    assert verifier.score_one("") == 0.0
    assert verifier.score_one("  ...  ") == 0.0
    assert verifier.score_group(PromptContext("q", "t"), ["a", ""]) == [1.0, 0.0]


def test_number_format_verifier():
    verifier = NumberFormatVerifier(max_words=4)
    assert verifier.score_one("12") == 1.0
    assert verifier.score_one("The sum is 12") == 1.0
    assert verifier.score_one("one two three four five six seven 8") == pytest.approx(0.5 + 0.5 * 0.5)
    assert verifier.score_one("Let me think.\nIt is 12") == 0.5
    assert verifier.score_one("I do not know") == 0.0


# -- composite --------------------------------------------------------------------------


class FixedScorer:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def score_group(self, context, responses):
        return list(self.values)


def recipes(**weights_by_task) -> dict[str, TaskRecipe]:
    return {task: TaskRecipe(weights) for task, weights in weights_by_task.items()}


class BrokenScorer:
    name = "broken"

    def score_group(self, context, responses):
        raise RuntimeError("judge unavailable")


def test_composite_weighted_mean():
    scorers = {"a": FixedScorer("a", [1.0, 0.0, 0.5]), "b": FixedScorer("b", [0.0, 1.0, 0.5])}
    composite = CompositeScorer(scorers, recipes(math={"a": 3.0, "b": 1.0}, default={"b": 1.0}))
    result = composite.score(PromptContext("q", "math"), ["x", "y", "z"])
    assert result.scores == pytest.approx([0.75, 0.25, 0.5])
    assert result.parts == [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.5, "b": 0.5}]
    assert result.failures == [{}, {}, {}]
    assert json.loads(result.parts_json(0)) == {"a": 1.0, "b": 0.0}
    assert composite.score_group(PromptContext("q", "math"), ["x", "y", "z"]) == pytest.approx([0.75, 0.25, 0.5])


def test_composite_routes_by_task_with_default_fallback():
    scorers = {"a": FixedScorer("a", [1.0, 0.0]), "b": FixedScorer("b", [0.0, 1.0])}
    composite = CompositeScorer(scorers, recipes(math={"a": 1.0}, default={"b": 1.0}))
    assert composite.score(PromptContext("q", "math"), ["x", "y"]).scores == [1.0, 0.0]
    other = composite.score(PromptContext("q", "poetry"), ["x", "y"])
    assert other.scores == [0.0, 1.0]
    assert other.parts == [{"b": 0.0}, {"b": 1.0}]


def test_a_failing_scorer_is_recorded_not_fatal():
    scorers = {"good": FixedScorer("good", [1.0, 0.5]), "broken": BrokenScorer()}
    composite = CompositeScorer(scorers, recipes(default={"good": 1.0, "broken": 1.0}))
    result = composite.score(PromptContext("q", "any"), ["x", "y"])
    assert all(math.isnan(score) for score in result.scores)  # a part that counts failed: unknown, not 0
    assert result.parts == [{"good": 1.0, "broken": None}, {"good": 0.5, "broken": None}]
    assert result.failures == [{"broken": "RuntimeError: judge unavailable"}] * 2
    assert json.loads(result.parts_json(1)) == {"broken": None, "good": 0.5}


def test_composite_values_that_are_no_score_are_unknown_and_recorded():
    values = [None, 1.0, float("nan"), float("inf"), "0.5", True]
    composite = CompositeScorer({"a": FixedScorer("a", values)}, recipes(default={"a": 2.0}))
    result = composite.score(PromptContext("q", "t"), ["x"] * len(values))
    assert result.scores[1] == 1.0 and all(math.isnan(result.scores[i]) for i in (0, 2, 3, 4, 5))
    assert result.failures[1] == {} and "not a score" in result.failures[0]["a"]
    assert "non-finite" in result.failures[2]["a"] and "non-finite" in result.failures[3]["a"]


def test_a_failed_part_with_zero_weight_does_not_count():
    scorers = {"good": FixedScorer("good", [1.0, 0.5]), "broken": BrokenScorer()}
    composite = CompositeScorer(scorers, recipes(default={"good": 1.0, "broken": 0.0}))
    assert composite.score(PromptContext("q", "any"), ["x", "y"]).scores == [1.0, 0.5]


def test_a_failed_gate_is_unknown_not_a_fail():
    scorers = {"valid": FixedScorer("valid", [Failed("valid: timeout"), 0.0]), "rank": FixedScorer("rank", [0.9, 1.0])}
    composite = CompositeScorer(scorers, {"default": TaskRecipe({"rank": 1.0}, gates=("valid",))})
    scores = composite.score(PromptContext("q", "any"), ["x", "y"]).scores
    assert math.isnan(scores[0]) and scores[1] == 0.0


def test_gate_zeroes_responses_that_fail_it():
    scorers = {"valid": FixedScorer("valid", [1.0, 0.0, 1.0]), "rank": FixedScorer("rank", [0.2, 1.0, 0.8])}
    composite = CompositeScorer(scorers, {"default": TaskRecipe({"rank": 1.0}, gates=("valid",))})
    result = composite.score(PromptContext("q", "any"), ["x", "y", "z"])
    assert result.scores == pytest.approx([0.2, 0.0, 0.8])
    assert result.parts[1] == {"valid": 0.0, "rank": 1.0}


def test_per_response_failure_is_recorded_with_its_reason():
    scorers = {"a": FixedScorer("a", [Failed("a: timeout after 2s"), 1.0])}
    result = CompositeScorer(scorers, recipes(default={"a": 1.0})).score(PromptContext("q", "t"), ["x", "y"])
    assert math.isnan(result.scores[0]) and result.scores[1] == 1.0
    assert result.failures == [{"a": "a: timeout after 2s"}, {}]
    assert result.parts[0] == {"a": None}


def test_length_penalty_discounts_long_responses_only():
    scorers = {"a": FixedScorer("a", [1.0, 1.0, 1.0])}
    composite = CompositeScorer(scorers, recipes(default={"a": 1.0}), length_penalty=1.0)
    result = composite.score(PromptContext("q", "t"), ["abcd", "abcd", "abcd" * 3])
    assert result.scores == pytest.approx([1.0, 1.0, 1.0 / 3.0])


def test_build_scorer_uses_the_settings():
    scorer = build_scorer(load_settings(DEMO_CONFIG).scoring)  # the demo's recipes for its two tasks
    context = PromptContext("What is 2 + 3? Reply with just the number.", "arithmetic")
    responses = ["5", "5", "The answer is 6 because I added wrongly and then kept going on and on"]
    result = scorer.score(context, responses)
    assert set(result.parts[0]) == {"self_consistency", "number_format"}
    # (1 * 2/3 + 0.25 * 1) / 1.25
    assert result.scores[0] == pytest.approx((2 / 3 + 0.25) / 1.25)
    assert result.scores[0] > result.scores[2]
    assert scorer.answers(context, responses) == ["5", "5", "6"]
    short = scorer.score(PromptContext("What colour is the sky?", "short_answer"), ["Blue", "blue."])
    assert set(short.parts[0]) == {"self_consistency", "concise_format"}
    assert short.scores == pytest.approx([1.0, 1.0])


def test_build_scorer_min_agreement():
    scorer = build_scorer(ScoringSettings(min_agreement=0.9, scorers={"default": {"self_consistency": 1.0}}))
    assert scorer.score(PromptContext("q?", "arithmetic"), ["1", "1", "2"]).scores == [0.0, 0.0, 0.0]


# -- score_responses --------------------------------------------------------------------


def test_score_responses_table():
    prompts = pd.DataFrame(
        {
            "prompt_id": ["p-math", "p-fact"],
            "prompt": ["What is 2 + 3?", "What is the capital of France?"],
            "system": [np.nan, "Be brief."],
            "task": ["arithmetic", "short_answer"],
        }
    )
    candidates = pd.DataFrame(
        {
            "response_id": ["r1", "r2", "r3", "r4", "r5"],
            "prompt_id": ["p-math", "p-math", "p-math", "p-fact", "p-fact"],
            "response": ["5", "It is 5.", "6", "Paris.", "Lyon"],
        }
    )
    scorer = build_scorer(load_settings(DEMO_CONFIG).scoring)  # the demo's recipes for its two tasks
    scores = score_responses(candidates, prompts, scorer, progress=False)
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == 5
    by_id = scores.set_index("response_id")
    assert by_id.loc["r1", "prompt_id"] == "p-math"
    assert by_id.loc["r1", "task"] == "arithmetic"
    assert by_id.loc[["r1", "r2", "r3"], "answer"].tolist() == ["5", "5", "6"]
    assert by_id.loc[["r4", "r5"], "answer"].tolist() == ["paris", "lyon"]
    parts = json.loads(by_id.loc["r1", "score_parts"])
    assert set(parts) == {"self_consistency", "number_format"}
    assert parts["self_consistency"] == pytest.approx(2 / 3)
    assert parts["number_format"] == 1.0
    assert by_id.loc["r1", "score"] == pytest.approx((2 / 3 + 0.25) / 1.25)
    assert by_id.loc["r1", "score"] > by_id.loc["r3", "score"]
    assert set(json.loads(by_id.loc["r4", "score_parts"])) == {"self_consistency", "concise_format"}
    assert scores["failures"].isna().all()


def test_score_responses_records_failures():
    prompts = pd.DataFrame({"prompt_id": ["p"], "prompt": ["q"], "system": [None], "task": ["t"]})
    candidates = pd.DataFrame({"response_id": ["a", "b"], "prompt_id": ["p", "p"], "response": ["x", "y"]})
    scorer = build_scorer(ScoringSettings(scorers={"default": {"self_consistency": 1.0}}))
    scorer.scorers["self_consistency"] = BrokenScorer()
    scores = score_responses(candidates, prompts, scorer, progress=False)
    assert scores["score"].isna().all()
    assert [json.loads(f) for f in scores["failures"]] == [{"self_consistency": "RuntimeError: judge unavailable"}] * 2
    assert json.loads(scores["score_parts"].iloc[0]) == {"self_consistency": None}


# -- the score cache ----------------------------------------------------------------------


class Killed(Exception):
    """Stands for the process dying in the middle of scoring."""


def recording_scorer(settings: ScoringSettings, calls: list[str], die_at_call: int | None = None):
    """The settings' scorer, appending each scored prompt to ``calls``; raises Killed on call ``die_at_call``."""
    scorer = build_scorer(settings)
    original = scorer.score

    def score(context, responses):
        calls.append(context.prompt)
        if len(calls) == die_at_call:
            raise Killed
        return original(context, responses)

    scorer.score = score
    return scorer


def test_score_cache_scores_each_candidate_group_once(tmp_path):
    from tao_pipeline.scoring import ScoreCache

    settings = ScoringSettings()
    prompts = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["What is 1 + 1?", "What is 2 + 2?"],
            "system": [None, None],
            "task": ["arithmetic", "arithmetic"],
        }
    )
    candidates = pd.DataFrame(
        {"response_id": ["a1", "a2", "b1", "b2"], "prompt_id": ["a", "a", "b", "b"], "response": ["2", "2", "4", "5"]}
    )
    calls = []
    scorer = recording_scorer(settings, calls)
    cache = ScoreCache(tmp_path, settings)
    first = score_responses(candidates, prompts, scorer, progress=False, cache=cache)
    assert len(calls) == 2
    again = score_responses(candidates, prompts, scorer, progress=False, cache=cache)
    assert len(calls) == 2
    pd.testing.assert_frame_equal(first, again)
    changed = candidates.assign(response_id=["a1", "a2", "b1", "b3"], response=["2", "2", "4", "4"])
    rescored = score_responses(changed, prompts, scorer, progress=False, cache=cache)
    assert calls[2:] == ["What is 2 + 2?"]  # only the prompt whose candidates changed
    assert rescored["response_id"].tolist() == ["a1", "a2", "b1", "b3"] and rescored["score"].tolist()[2:] == [1.0, 1.0]
    other_settings = ScoringSettings(min_agreement=0.9)
    assert ScoreCache(tmp_path, other_settings).folder != cache.folder


def test_scoring_stopped_half_way_resumes_from_its_shards(tmp_path, monkeypatch):
    """A run that dies after two shards keeps them; the rerun scores only the rest and matches an unbroken run."""
    import tao_pipeline.scoring as scoring
    from tao_pipeline.scoring import ScoreCache

    monkeypatch.setattr(scoring, "SCORE_SHARD_PROMPTS", 4)
    settings = ScoringSettings()
    count = 11
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i:02d}" for i in range(count)],
            "prompt": [f"What is {i} + 1?" for i in range(count)],
            "system": [None] * count,
            "task": ["arithmetic"] * count,
        }
    )
    candidates = pd.DataFrame(
        {
            "response_id": [f"p{i:02d}-{j}" for i in range(count) for j in range(3)],
            "prompt_id": [f"p{i:02d}" for i in range(count) for _ in range(3)],
            "response": [str(i + 1 + (j == 2)) for i in range(count) for j in range(3)],
        }
    )
    unbroken = score_responses(
        candidates, prompts, build_scorer(settings), progress=False, cache=ScoreCache(tmp_path / "unbroken", settings)
    )

    # Dies in the middle of the third shard; Killed escapes score_responses, as a kill would.
    dying = recording_scorer(settings, [], die_at_call=9)
    cache_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        score_responses(candidates, prompts, dying, progress=False, cache=ScoreCache(cache_dir, settings))
    assert len(list((cache_dir / "scores").glob("*/*.parquet"))) == 2
    assert not list((cache_dir / "scores").glob("*/.*.tmp"))

    rescored = []
    resumed_scorer = recording_scorer(settings, rescored)
    cache = ScoreCache(cache_dir, settings)
    resumed = score_responses(candidates, prompts, resumed_scorer, progress=False, cache=cache)
    assert len(rescored) == count - 8 and cache.cached_groups == 8
    assert resumed["response_id"].is_unique and len(resumed) == len(candidates)
    pd.testing.assert_frame_equal(resumed, unbroken)

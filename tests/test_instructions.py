"""InstructionVerifier: IFEval-style checks declared per task and per prompt."""

from __future__ import annotations

import pytest

from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.instructions import InstructionVerifier, count_bullets, count_sentences
from tao_pipeline.settings import ScoringSettings

BULLETED = "Reasons:\n- fast\n* cheap\n• simple\n  1. nested\n2) last\n**Bold** is not a bullet\n---"


def score(response: str, task_constraints: dict | None = None, **prompt_constraints) -> float:
    verifier = InstructionVerifier(constraints=task_constraints)
    context = PromptContext("Do as told.", "default", constraints=prompt_constraints)
    return verifier.score_group(context, [response])[0]


# -- helpers -------------------------------------------------------------------------------


def test_count_bullets():
    assert count_bullets(BULLETED) == 5
    assert count_bullets("No bullets here.\n-not one\n3.14 is pi") == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("One. Two! Three?", 3),
        ("Pi is 3.14 and e.g. Dr. Smith agrees.", 1),
        ('He said "stop." Then left.', 2),
        ("- first item\n- second item\n\nDone.", 3),
        ("", 0),
    ],
)
def test_count_sentences(text, expected):
    assert count_sentences(text) == expected


# -- each check passing and failing ------------------------------------------------------


@pytest.mark.parametrize(
    "constraints, passing, failing",
    [
        ({"min_words": 3}, "one two three", "one two"),
        ({"max_words": 3}, "one two three", "one two three four"),
        (
            {"required_keywords": ["Paris", "river Seine"]},
            "PARIS lies on the River\nSeine.",
            "Paris lies on the Seine.",
        ),
        ({"required_keywords": "cat"}, "A cat sat.", "A category error."),
        ({"forbidden_words": ["very", "really good"]}, "Every answer is REALLY fine.", "It is Really  good."),
        ({"min_bullets": 2}, "- a\n- b", "- a\nb"),
        ({"max_bullets": 1}, "- a\nb", "- a\n- b"),
        ({"bullets": 3}, "1. a\n2. b\n3. c", "1. a\n2. b"),
        ({"case": "lower"}, "all lower, 42 too.", "Not lower."),
        ({"case": "upper"}, "ALL CAPS, 42 TOO!", "ALL CAPS but one"),
        ({"case": "title"}, "The Quick (Brown) Fox's Den", "The quick Brown Fox"),
        ({"starts_with": "Dear  Sir"}, "  dear sir,\nthanks", "Hello dear sir"),
        ({"ends_with": "Is there anything else?"}, "Done. Is there anything\nelse?  ", "Is there anything else? Yes."),
        ({"no_commas": True}, "No commas here.", "Yes, one comma."),
        ({"min_sentences": 2}, "One. Two.", "Just one."),
        ({"max_sentences": 2}, "One. Two.", "One. Two. Three."),
    ],
)
def test_each_check_passes_and_fails(constraints, passing, failing):
    assert score(passing, **constraints) == 1.0
    assert score(failing, **constraints) == 0.0
    assert score(passing, task_constraints=constraints) == 1.0
    assert score(failing, task_constraints=constraints) == 0.0


def test_score_is_the_share_of_declared_checks_passed():
    constraints = {"max_words": 5, "case": "lower", "no_commas": True, "ends_with": "bye"}
    assert score("hello, bye", **constraints) == 0.75
    assert score("Hello, Bye", **constraints) == 0.5
    assert score("Hello there, my friend, goodbye now", **constraints) == 0.0


def test_no_declared_checks_scores_one():
    assert score("Anything goes.") == 1.0
    assert score("Anything, goes.", no_commas=False, required_keywords=[]) == 1.0


def test_prompt_constraints_override_and_extend_task_constraints():
    task = {"max_words": 3, "case": "lower"}
    verifier = InstructionVerifier(constraints=task)
    responses = ["a short reply", "a slightly longer reply here", "A Short Reply"]
    plain = PromptContext("p", "default")
    assert verifier.score_group(plain, responses) == [1.0, 0.5, 0.5]
    overridden = PromptContext("p", "default", constraints={"max_words": 10, "required_keywords": ["reply"]})
    assert verifier.score_group(overridden, responses) == [1.0, 1.0, pytest.approx(2 / 3)]
    dropped = PromptContext("p", "default", constraints={"case": None})
    assert verifier.score_group(dropped, responses) == [1.0, 0.0, 1.0]


def test_unknown_keys_are_ignored_and_listed():
    verifier = InstructionVerifier()
    constraints = {"max_words": 2, "json_schema": {"type": "object"}, "regex": "x", "max_lines": 3}
    assert verifier.unknown_keys(constraints) == ["json_schema", "max_lines", "regex"]
    assert verifier.unknown_keys({"case": "lower"}) == []
    assert score("two words", **constraints) == 1.0


def test_bad_per_prompt_value_gives_failed():
    verifier = InstructionVerifier(constraints={"max_words": 5})
    for bad in (
        {"case": "camel"},
        {"max_words": -2},
        {"required_keywords": [""]},
        {"no_commas": "yes"},
        {"min_sentences": 4, "max_sentences": 2},
        {"ends_with": 7},
    ):
        scores = verifier.score_group(PromptContext("p", "default", constraints=bad), ["a", "b"])
        assert len(scores) == 2
        assert all(isinstance(s, Failed) and next(iter(bad)) in s.reason for s in scores), bad


@pytest.mark.parametrize(
    "constraints, message",
    [
        ({"case": "sentence"}, "case must be one of"),
        ({"bullets": True}, "bullets must be a non-negative integer"),
        ({"min_words": 10, "max_words": 5}, r"min_words \(10\) is above max_words \(5\)"),
        ({"forbidden_words": "  "}, "forbidden_words must be a list of non-empty strings"),
        ({"starts_with": ""}, "starts_with must be a non-empty string"),
    ],
)
def test_bad_task_constraints_raise_at_construction(constraints, message):
    with pytest.raises(ValueError, match=f"instruction_following: {message}"):
        InstructionVerifier(constraints=constraints)


def test_instruction_verifier_is_registered():
    settings = ScoringSettings(options={"instruction_following": {"constraints": {"max_words": 3}}})
    scorer = build_named_scorer("instruction_following", settings, None)
    assert isinstance(scorer, InstructionVerifier)
    assert scorer.name == "instruction_following"
    assert scorer.score_group(PromptContext("p", "default"), ["one two", "one two three four"]) == [1.0, 0.0]
    misplaced = ScoringSettings(options={"instruction_following": {"max_words": 3}})  # belongs under constraints
    with pytest.raises(ValueError, match="scoring.options.instruction_following"):
        build_named_scorer("instruction_following", misplaced, None)

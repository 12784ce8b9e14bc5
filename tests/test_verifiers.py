"""Label-free verifiers: JSON, regex, length and arithmetic consistency, their registration and gating."""

from __future__ import annotations

import pytest

from tao_pipeline.scoring import PromptContext, build_scorer
from tao_pipeline.scoring.base import Failed
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.verifiers import (
    ArithmeticConsistencyVerifier,
    JsonVerifier,
    LengthVerifier,
    RegexVerifier,
    arithmetic_claims,
    count_words,
)
from tao_pipeline.settings import ScoringSettings

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def context(**constraints) -> PromptContext:
    return PromptContext("Answer the question.", "default", constraints=constraints)


# -- count_words --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, world!", 2),
        ("Don't panic: it's well-known.", 4),
        ("naïve café", 2),
        ("  - * 3.14 --  ", 2),
        ("", 0),
    ],
)
def test_count_words(text, expected):
    assert count_words(text) == expected


# -- JsonVerifier ------------------------------------------------------------------------


def test_json_without_schema_scores_validity():
    responses = [
        '{"name": "Ada", "age": 36}',
        'Here you go:\n```json\n{"name": "Ada"}\n```\nAnything else?',
        "[1, 2, 3]",
        "{name: 'Ada'}",
        "No JSON at all.",
        "",
    ]
    assert JsonVerifier().score_group(context(), responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_json_schema_option_gives_half_for_valid_json_that_does_not_conform():
    verifier = JsonVerifier(schema=PERSON_SCHEMA)
    responses = ['{"name": "Ada", "age": 36}', '{"name": "Ada", "age": -1}', '{"name": "Ada"}', "not json"]
    assert verifier.score_group(context(), responses) == [1.0, 0.5, 0.5, 0.0]


def test_json_any_conforming_value_in_the_response_counts():
    response = 'First try: {"name": "Ada"}. Fixed: {"name": "Ada", "age": 36}'
    assert JsonVerifier(schema=PERSON_SCHEMA).score_group(context(), [response]) == [1.0]


def test_json_per_prompt_schema_replaces_the_option():
    verifier = JsonVerifier(schema=PERSON_SCHEMA)
    list_schema = {"type": "array", "items": {"type": "integer"}}
    responses = ["[1, 2, 3]", '{"name": "Ada", "age": 36}']
    assert verifier.score_group(context(json_schema=list_schema), responses) == [1.0, 0.5]
    assert verifier.score_group(context(), responses) == [0.5, 1.0]


def test_json_require_whole_response():
    verifier = JsonVerifier(require_whole_response=True, schema=PERSON_SCHEMA)
    responses = [
        '  {"name": "Ada", "age": 36}\n',
        '```json\n{"name": "Ada", "age": 36}\n```',
        'Sure! {"name": "Ada", "age": 36}',
        '{"name": "Ada", "age": "old"}',
        "42",
    ]
    assert verifier.score_group(context(), responses) == [1.0, 1.0, 0.0, 0.5, 0.0]


def test_json_bad_schema_option_raises_and_bad_prompt_schema_fails():
    with pytest.raises(ValueError, match="json_valid: invalid schema"):
        JsonVerifier(schema={"type": "no-such-type"})
    with pytest.raises(ValueError, match="must be an object"):
        JsonVerifier(schema=["not", "a", "schema"])
    scores = JsonVerifier().score_group(context(json_schema={"type": 7}), ['{"a": 1}', "x"])
    assert all(isinstance(s, Failed) and "invalid json_schema" in s.reason for s in scores)


def test_json_pathologically_nested_response_scores_zero():
    assert JsonVerifier().score_group(context(), ["[" * 5000]) == [0.0]


# -- RegexVerifier -----------------------------------------------------------------------


def test_regex_search_and_fullmatch():
    responses = ["The answer is ABC-123.", "ABC-123", "abc-123"]
    assert RegexVerifier(pattern=r"[A-Z]{3}-\d{3}").score_group(context(), responses) == [1.0, 1.0, 0.0]
    fullmatch = RegexVerifier(pattern=r"[A-Z]{3}-\d{3}", mode="fullmatch")
    assert fullmatch.score_group(context(), [*responses, "  ABC-123\n"]) == [0.0, 1.0, 0.0, 1.0]


def test_regex_per_prompt_pattern_and_mode_override_options():
    verifier = RegexVerifier(pattern=r"\d+")
    responses = ["yes", "Yes, 3 of them", "no"]
    assert verifier.score_group(context(), responses) == [0.0, 1.0, 0.0]
    assert verifier.score_group(context(regex=r"(?i)yes|no"), responses) == [1.0, 1.0, 1.0]
    assert verifier.score_group(context(regex=r"(?i)yes|no", regex_mode="fullmatch"), responses) == [1.0, 0.0, 1.0]


def test_regex_without_any_pattern_declares_nothing():
    assert RegexVerifier().score_group(context(), ["anything", ""]) == [1.0, 1.0]


def test_regex_bad_option_pattern_raises_naming_it():
    with pytest.raises(ValueError, match=r"regex_format: bad regular expression '\(unclosed'"):
        RegexVerifier(pattern="(unclosed")
    with pytest.raises(ValueError, match="mode must be one of"):
        RegexVerifier(pattern="a", mode="match")


def test_regex_bad_per_prompt_pattern_gives_failed():
    scores = RegexVerifier(pattern="a").score_group(context(regex="[z-a]"), ["a", "b"])
    assert len(scores) == 2
    assert all(isinstance(s, Failed) and "[z-a]" in s.reason for s in scores)
    assert isinstance(RegexVerifier().score_group(context(regex=5), ["a"])[0], Failed)


# -- LengthVerifier ----------------------------------------------------------------------


def n_words(n: int) -> str:
    return " ".join(["word"] * n)


def test_length_max_words_decays_to_zero_at_twice_the_limit():
    verifier = LengthVerifier(max_words=10)
    responses = [n_words(5), n_words(10), n_words(15), n_words(20), n_words(40)]
    assert verifier.score_group(context(), responses) == [1.0, 1.0, 0.5, 0.0, 0.0]


def test_length_min_words_decays_to_zero_at_half_the_limit():
    verifier = LengthVerifier(min_words=10)
    responses = [n_words(12), n_words(10), n_words(8), n_words(5), ""]
    assert verifier.score_group(context(), responses) == pytest.approx([1.0, 1.0, 0.6, 0.0, 0.0])


def test_length_chars_counts_the_stripped_response_and_the_lowest_limit_wins():
    verifier = LengthVerifier(max_chars=10, min_words=2)
    responses = ["  abc def \n", "abcdefghijklmno", "abc defghijklmno"]
    # 15 chars: 0.5 on max_chars; one word: 0 on min_words (half of 2 or fewer).
    assert verifier.score_group(context(), responses) == [1.0, 0.0, pytest.approx(0.4)]


def test_length_max_zero_allows_only_empty():
    assert LengthVerifier(max_words=0).score_group(context(), ["", "one"]) == [1.0, 0.0]


def test_length_per_prompt_limits_override_and_null_removes():
    verifier = LengthVerifier(max_words=5, min_words=2)
    responses = [n_words(1), n_words(8)]
    assert verifier.score_group(context(), responses) == [0.0, pytest.approx(0.4)]
    assert verifier.score_group(context(max_words=10), responses) == [0.0, 1.0]
    assert verifier.score_group(context(min_words=None, max_words=10), responses) == [1.0, 1.0]
    assert LengthVerifier().score_group(context(), responses) == [1.0, 1.0]


def test_length_construction_errors():
    with pytest.raises(ValueError, match="max_words must be a non-negative integer"):
        LengthVerifier(max_words=-1)
    with pytest.raises(ValueError, match="min_chars .20. is above max_chars .10."):
        LengthVerifier(min_chars=20, max_chars=10)
    with pytest.raises(ValueError, match="min_words must be a non-negative integer"):
        LengthVerifier(min_words=2.5)


def test_length_bad_per_prompt_limit_gives_failed():
    scores = LengthVerifier(max_words=5).score_group(context(max_words="five"), ["a", "b"])
    assert all(isinstance(s, Failed) and "max_words" in s.reason for s in scores)
    inverted = LengthVerifier(max_words=5).score_group(context(min_words=9), ["a"])
    assert isinstance(inverted[0], Failed) and "above max_words" in inverted[0].reason


# -- ArithmeticConsistencyVerifier --------------------------------------------------------


@pytest.mark.parametrize(
    "text, claims",
    [
        ("We know 2 + 3 = 5, so the total is 5.", ["2 + 3 = 5"]),
        ("3 × 4 = 12 and 12 ÷ 4 = 3.", ["3 × 4 = 12", "12 ÷ 4 = 3"]),
        ("1,200 * 3 = 3,600", ["1,200 * 3 = 3,600"]),
        ("5 + 3 = 8 + 2 = 10", ["5 + 3 = 8", "8 + 2 = 10"]),
        ("x = 10 - 4 = 6", ["10 - 4 = 6"]),
        ("2 + 3 + 4 = 9", ["2 + 3 + 4 = 9"]),
        ("(2 + 3) * 4 = 20", []),
        ("2^3 + 1 = 9", []),
        ("2x + 3 = 7", []),
        ("2 + 3 = 5x", []),
        ("In 2023, 2 + 2 = 4.", ["2 + 2 = 4"]),
        ("12 x\n  3 = 36", ["12 x 3 = 36"]),
        ("No maths here, just 42.", []),
    ],
)
def test_arithmetic_claims_found(text, claims):
    assert arithmetic_claims(text) == claims


@pytest.mark.parametrize(
    "response, expected",
    [
        ("2 + 3 = 5", 1.0),
        ("2 + 3 = 6", 0.0),
        ("First 7 * 8 = 56, then 56 - 6 = 51.", 0.5),
        ("0.1 * 3 = 0.3", 1.0),
        ("1.1 + 2.2 = 3.3", 1.0),
        ("0.1 + 0.2 = 0.3000001", 0.0),
        ("7 * 8 = 56.5", 0.0),
        ("2.5 x 4 = 10", 1.0),
        ("7 - 10 = -3", 1.0),
        ("5-3-1=1", 1.0),
        ("10 - -3 = 13", 1.0),
        ("−4 × −2 = 8", 1.0),
        ("3 * $4 = $12", 1.0),
        ("2 + 3 * 4 = 14", 1.0),
        ("2 + 3 * 4 = 20", 0.0),
        ("10 / 4 = 2.5", 1.0),
        ("10 / 3 = 3.3333333", 1.0),
        ("10 / 3 = 3.33", 0.0),
        ("10 / 0 = 0", 0.0),
        ("Half of it: 9 ÷ 0 = 4.5 and 1 + 1 = 2", 0.5),
    ],
)
def test_arithmetic_scores_the_share_of_true_claims(response, expected):
    assert ArithmeticConsistencyVerifier().score_group(context(), [response]) == [expected]


def test_arithmetic_no_claims_score_option():
    responses = ["The capital of France is Paris.", ""]
    assert ArithmeticConsistencyVerifier().score_group(context(), responses) == [0.5, 0.5]
    assert ArithmeticConsistencyVerifier(no_claims_score=0.0).score_group(context(), responses) == [0.0, 0.0]
    with pytest.raises(ValueError, match="no_claims_score must be in"):
        ArithmeticConsistencyVerifier(no_claims_score=2.0)


def test_arithmetic_accept_rounded_division():
    verifier = ArithmeticConsistencyVerifier(accept_rounded_division=True)
    responses = ["10 / 3 = 3.33", "2 / 3 = 0.67", "10 / 3 = 3.34", "10 / 3 = 3", "10 * 3 = 30.0"]
    assert verifier.score_group(context(), responses) == [1.0, 1.0, 0.0, 0.0, 1.0]


# -- registration and gating end to end ------------------------------------------------


@pytest.mark.parametrize(
    "name, options, verifier_class",
    [
        ("json_valid", {"schema": PERSON_SCHEMA, "require_whole_response": True}, JsonVerifier),
        ("regex_format", {"pattern": r"^\d+$", "mode": "fullmatch"}, RegexVerifier),
        ("length_limit", {"max_words": 50}, LengthVerifier),
        ("arithmetic_consistency", {"no_claims_score": 0.25}, ArithmeticConsistencyVerifier),
    ],
)
def test_verifiers_are_registered(name, options, verifier_class):
    scorer = build_named_scorer(name, ScoringSettings(options={name: options}), None)
    assert isinstance(scorer, verifier_class)
    assert scorer.name == name


def test_registered_verifier_with_unknown_option_is_a_value_error():
    with pytest.raises(ValueError, match="scoring.options.length_limit"):
        build_named_scorer("length_limit", ScoringSettings(options={"length_limit": {"max_lines": 3}}), None)


def test_json_gate_end_to_end_through_build_scorer():
    settings = ScoringSettings(
        scorers={"default": {"self_consistency": 1.0}, "json": {"json_valid": 1.0}},
        gates={"json": ["json_valid"]},
        extractors={"default": "short_phrase", "json": "json_field:name"},
    )
    scorer = build_scorer(settings)
    prompt = PromptContext("Give the person as JSON.", "json", constraints={"json_schema": PERSON_SCHEMA})
    responses = ['{"name": "Ada", "age": 36}', '{"name": "Ada"}', "Ada, 36 years old"]
    result = scorer.score(prompt, responses)
    assert result.scores == [1.0, 0.0, 0.0]
    assert [part["json_valid"] for part in result.parts] == [1.0, 0.5, 0.0]
    assert scorer.answers(prompt, responses) == ["ada", "ada", None]
    without_schema = scorer.score(PromptContext("Give the person as JSON.", "json"), responses)
    assert without_schema.scores == [1.0, 1.0, 0.0]

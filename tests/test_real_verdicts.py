"""Only a real verdict is a signal: a judge's score counts only from the format its prompt requires, in range.

Pointwise, the answer's last non-blank line is exactly ``Score: N`` (N an integer 1..10) and no other
line states a score; in group mode the answer is exactly ``{"scores": [...]}`` (one ```json fence
allowed), one integer 1..10 per candidate. Anything else (a refusal that mentions "2 languages",
"retry after 5 seconds", a gateway's error JSON with ``"code": 3``, an HTML error page, a score in
prose or markdown, out of range, fractional, negative, twice) is unknown: never a score, never a
side of a pair. The examples go through a real HTTP judge server and the real scoring and pairing.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tao_pipeline.scoring import score_candidates
from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.judge import (
    NO_SCORE_LINE,
    NOT_INTEGER_SCORES,
    NOT_SCORES_JSON,
    SEVERAL_SCORES,
    group_call,
    parse_group,
    parse_pointwise,
    pointwise_call,
)
from tao_pipeline.settings import ScoringSettings
from tao_pipeline.training.pairs import build_pairs
from tests.helpers import fuzz_examples
from tests.judge_server import FakeJudgeServer, chat_completion, openai_judge

CONTEXT = PromptContext("Translate 'cat' into French.", "chat")
# The issue's three: each once scored 0.44, 0.11 and 0.22, and refusals became the rejected side of pairs.
ISSUE_EXAMPLES = [
    "Rate limit reached, retry after 5 seconds.",
    "I'm sorry, I can only evaluate answers in 2 languages.",
    json.dumps({"error": {"message": "Bad gateway", "type": "upstream_error", "code": 3}}),
]
HTML_ERROR_PAGE = "<html><head><title>502 Bad Gateway</title></head>\n<body>Score: 5</body>\n</html>"


# -- pointwise -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, score",
    [
        ("Score: 7", 6 / 9),
        ("Correct and concise.\nScore: 10", 1.0),
        ("Wrong answer.\nScore: 1", 0.0),
        ("Fine.\n\n  Score:3  \n\n", 2 / 9),
        ("Fine.\r\nSCORE: 4\r\n", 3 / 9),
        ("The scores of other answers do not matter here.\nScore: 6", 5 / 9),  # "scores" is not a score line
    ],
)
def test_a_final_score_line_is_a_verdict(output, score):
    assert parse_pointwise(output) == pytest.approx(score)


@pytest.mark.parametrize(
    "output, reason",
    [
        *[(example, NO_SCORE_LINE) for example in ISSUE_EXAMPLES],
        (HTML_ERROR_PAGE, NO_SCORE_LINE),
        ("", NO_SCORE_LINE),
        (" \n\t\n", NO_SCORE_LINE),
        ("Score: 0", NO_SCORE_LINE),  # out of range
        ("Score: 11", NO_SCORE_LINE),
        ("Score: 100", NO_SCORE_LINE),
        ("Score: -3", NO_SCORE_LINE),  # negative
        ("Score: 7.5", NO_SCORE_LINE),  # fractional
        ("Score: 7.0", NO_SCORE_LINE),
        ("Score: 7/10", NO_SCORE_LINE),  # another format
        ("Score: 7 out of 10", NO_SCORE_LINE),
        ("Score: 07", NO_SCORE_LINE),
        ("Score: seven", NO_SCORE_LINE),
        ("Score: \u0667", NO_SCORE_LINE),  # an Arabic-Indic seven
        ("Score: \uff17", NO_SCORE_LINE),  # a full-width seven
        ("\u017fcore: 7", NO_SCORE_LINE),  # a long s: "score" only under Unicode case folding
        ("\uff33core: 7", NO_SCORE_LINE),  # a full-width S
        ("Score: 7.", NO_SCORE_LINE),
        ("**Score:** 7", NO_SCORE_LINE),  # markdown
        ("Score: **7**", NO_SCORE_LINE),
        ("## Score: 7", NO_SCORE_LINE),
        ("I'd give it a 7.", NO_SCORE_LINE),  # a score in prose
        ("Overall a solid 8/10 answer.", NO_SCORE_LINE),
        ("Score: 7\nThanks for asking!", NO_SCORE_LINE),  # not the last line
        ("Score: 7 Score: 8", NO_SCORE_LINE),
        ('{"score": 7}', NO_SCORE_LINE),  # JSON is the group format, not this one
        ("Score: 3\nOn reflection, better.\nScore: 8", SEVERAL_SCORES),  # several score lines
        ("**Score:** 3\nScore: 8", SEVERAL_SCORES),
        ("My first score: 2, then reconsidered.\nScore: 9", SEVERAL_SCORES),
        ("score = 4\nScore: 9", SEVERAL_SCORES),
    ],
)
def test_anything_else_is_no_verdict(output, reason):
    assert parse_pointwise(output) == Failed(reason)


TEXT_WITHOUT_SCORES = st.text(max_size=300).filter(lambda text: "score" not in text.lower())


@hypothesis_settings(max_examples=fuzz_examples(2000))
@given(TEXT_WITHOUT_SCORES)
def test_text_that_states_no_score_is_never_a_verdict(text):
    """Numbers anywhere (error codes, retry delays, "2 languages") give nothing without the score line."""
    assert isinstance(parse_pointwise(text), Failed)


@hypothesis_settings(max_examples=fuzz_examples(2000))
@given(TEXT_WITHOUT_SCORES, st.integers(-20, 30))
def test_a_justification_then_a_score_line_is_that_score_when_in_range(justification, number):
    parsed = parse_pointwise(f"{justification}\nScore: {number}")
    if 1 <= number <= 10:
        assert parsed == pytest.approx((number - 1) / 9)
    else:
        assert parsed == Failed(NO_SCORE_LINE)


# -- group -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        '{"scores": [2, 10, 1]}',
        '  {"scores":[2,10,1]}\n',
        '```json\n{"scores": [2, 10, 1]}\n```',
        '```\n{"scores": [2, 10, 1]}\n```',
    ],
)
def test_the_scores_object_alone_is_a_verdict(output):
    assert parse_group(output, 3) == pytest.approx([1 / 9, 1.0, 0.0])


@pytest.mark.parametrize(
    "output, reason",
    [
        *[(example, NOT_SCORES_JSON) for example in ISSUE_EXAMPLES],
        (HTML_ERROR_PAGE, NOT_SCORES_JSON),
        ("", NOT_SCORES_JSON),
        ("[2, 10, 1]", NOT_SCORES_JSON),  # a bare list
        ('{"scores": [2, 10, 1], "reasoning": "..."}', NOT_SCORES_JSON),  # extra keys
        ('{"error": "upstream", "code": 3, "scores": [3, 3, 3]}', NOT_SCORES_JSON),
        ('{"Scores": [2, 10, 1]}', NOT_SCORES_JSON),
        ('{"scores": [2, 10, 1], "scores": [9, 9, 9]}', NOT_SCORES_JSON),  # which one?
        ('Here you go: {"scores": [2, 10, 1]}', NOT_SCORES_JSON),  # prose around it
        ('```json\n{"scores": [2, 10, 1]}\n```\nHope this helps.', NOT_SCORES_JSON),
        ('```json\n{"scores": [1, 1, 1]}\n```\n```json\n{"scores": [2, 10, 1]}\n```', NOT_SCORES_JSON),
        ('{"scores": "2, 10, 1"}', NOT_SCORES_JSON),
        ('{"scores": [2, 10, 1]', NOT_SCORES_JSON),  # cut short
        ("[" * 100_000 + "]" * 100_000, NOT_SCORES_JSON),  # deeper than the parser goes
        ('{"scores": [2, 10, 1.5]}', NOT_INTEGER_SCORES),  # fractional
        ('{"scores": [2, 10, 1.0]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, 10, -1]}', NOT_INTEGER_SCORES),  # negative
        ('{"scores": [0, 10, 1]}', NOT_INTEGER_SCORES),  # out of range
        ('{"scores": [2, 11, 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, "10", 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, true, 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, null, 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, NaN, 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, Infinity, 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, [10], 1]}', NOT_INTEGER_SCORES),
        ('{"scores": [2, 10, 1' + "0" * 5000 + "]}", NOT_SCORES_JSON),  # an integer too long to read
        ('{"scores": [2, 10]}', "llm_judge: no verdict: 2 scores for 3 responses"),
        ('{"scores": [2, 10, 1, 4]}', "llm_judge: no verdict: 4 scores for 3 responses"),
    ],
)
def test_anything_else_leaves_the_group_unknown(output, reason):
    assert parse_group(output, 3) == [Failed(reason)] * 3


# -- the prompts ask for exactly these formats -------------------------------------------------------


def test_the_prompts_ask_for_the_format_that_is_parsed():
    pointwise = pointwise_call(CONTEXT, "chat", "Be fair.").system
    assert "end your answer with one line of exactly this form, and nothing after it:\nScore: N\n" in pointwise
    assert "integer from 1 (worst) to 10 (best)" in pointwise and "'Score:' only on that last line" in pointwise
    assert "any other form is discarded" in pointwise
    group = group_call(CONTEXT, ["chat", "chien", "mouse"], "Be fair.").system
    assert "Answer with this JSON object and nothing else" in group
    assert '{"scores": [<score 1>, <score 2>, <score 3>]}' in group and "any other form is discarded" in group
    # An answer written exactly as asked is a verdict.
    example = re.search(r"\nScore: N\n", pointwise).group().replace("N", "8")
    assert parse_pointwise("Accurate." + example) == pytest.approx(7 / 9)
    assert parse_group('{"scores": [8, 8, 8]}', 3) == pytest.approx([7 / 9] * 3)


# -- through a real judge server, scoring and pairing ------------------------------------------------

PROMPTS = pd.DataFrame(
    {
        "prompt_id": ["p0", "p1", "p2"],
        "prompt": ["Translate 'cat'.", "Translate 'dog'.", "Translate 'bird'."],
        "system": [None] * 3,
        "task": ["chat"] * 3,
    }
)
CANDIDATES = pd.DataFrame(
    {
        "response_id": [f"p{i}-{j}" for i in range(3) for j in range(4)],
        "prompt_id": [f"p{i}" for i in range(3) for j in range(4)],
        "response": [f"answer {j} to {i}" for i in range(3) for j in range(4)],
    }
)


def judge_answers(body, headers):
    """A judge that gives a real verdict for two candidates of each prompt, and junk for the others."""
    system, user = (message["content"] for message in body["messages"])
    if "candidate responses" in system:
        return 200, chat_completion(ISSUE_EXAMPLES[2])  # the gateway's error, relayed as the answer
    candidate = int(re.search(r"answer (\d) to", user).group(1))
    answers = ["Best.\nScore: 9", "Weak.\nScore: 2", *ISSUE_EXAMPLES[:2]]
    return 200, chat_completion(answers[candidate])


def test_junk_answers_are_unknown_and_never_a_side_of_a_pair(tmp_path):
    server = FakeJudgeServer(judge_answers)
    try:
        options = {"backend": "openai", "base_url": server.base_url, "model": "judge-test", "max_retries": 0}
        settings = ScoringSettings(
            scorers={"default": {"llm_judge": 1.0}}, options={"llm_judge": options}, max_unscored_share=0.9
        )
        scores, _ = score_candidates(CANDIDATES, PROMPTS, settings, tmp_path)
        group_scores = openai_judge(server, mode="group").score_group(CONTEXT, ["a", "b"])
    finally:
        server.close()
    shown = {
        rid: None if pd.isna(score) else round(score * 9) + 1
        for rid, score in zip(scores["response_id"], scores["score"])
    }
    assert shown == {f"p{i}-{j}": [9, 2, None, None][j] for i in range(3) for j in range(4)}
    junk = scores[scores["score"].isna()]
    assert set(junk["failures"]) == {json.dumps({"llm_judge": NO_SCORE_LINE})}
    pairs, stats = build_pairs(PROMPTS, CANDIDATES, scores, min_margin=0.1)
    assert sorted(pairs["chosen_response_id"]) == ["p0-0", "p1-0", "p2-0"]
    assert sorted(pairs["rejected_response_id"]) == ["p0-1", "p1-1", "p2-1"]  # the real low verdicts, only
    assert stats.unscored_responses == 6
    assert group_scores == [Failed(NOT_SCORES_JSON)] * 2  # the gateway's JSON, relayed as a group answer

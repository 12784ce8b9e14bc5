r"""The math_verify extractor: math-verify parses the answer (as TRL's and open-r1's accuracy rewards do), so
'\frac12' and '0.5' are one answer in a self-consistency vote."""

from __future__ import annotations

import threading
import time

import pytest

from tao_pipeline.scoring import PromptContext, build_scorer
from tao_pipeline.scoring.extractors import answer_matches, get_extractor, math_answer
from tao_pipeline.scoring.self_consistency import SelfConsistencyScorer
from tao_pipeline.settings import ScoringSettings, SettingsError, load_settings

HALF = [
    r"\frac12",
    r"$\frac{1}{2}$",
    r"The answer is \frac{1}{2}.",
    "1/2",
    "0.5",
    "0.50",
    r"Half: $50\%$",
    r"so the probability is $\boxed{\frac{2}{4}}$",
    r"Final answer: \boxed{0.5}",
    r"$x = \frac{1}{2}$",
]


@pytest.mark.parametrize("response", HALF)
def test_every_way_of_writing_one_half_is_one_answer(response):
    assert math_answer(response) == "0.5"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 42.", "42"),
        ("1,000", "1000"),
        ("1000.0", "1000"),
        (r"$-\frac{3}{4}$", "-0.75"),
        (r"$\frac{1}{\sqrt{2}}$", "0.707107"),  # irrational: compared at math-verify's 6 places
        (r"$\frac{\sqrt{2}}{2}$", "0.707107"),
        (r"$\frac{1}{3}$", "0.333333"),
        ("0.333333", "0.333333"),
        (r"$2^{-30}$", "0.000000000931323"),  # small numbers keep 6 significant digits, not 0
        (r"$10^{20}+0.5$", "100000000000000000000.5"),
        (r"$\{2, 1\}$", "{1, 2}"),
        (r"$x^2 + 1$", "x**2 + 1"),
        (r"$1 + x^2$", "x**2 + 1"),
    ],
)
def test_canonical_answers(response, expected):
    assert math_answer(response) == expected


@pytest.mark.parametrize("response", ["", "   ", "I do not know.", "forty two", r"no idea \o/", r"$\frac{0}{0}$"])
def test_no_mathematical_answer_is_none(response):
    assert math_answer(response) is None


def test_a_huge_power_is_not_evaluated_exactly():
    started = time.perf_counter()
    assert math_answer(r"$9^{9^{9}}$") == "4.28124773176e+369693099"  # 9^387420489 exactly would never finish
    assert time.perf_counter() - started < 5


def test_it_works_outside_the_main_thread():
    """math-verify's time limit is an alarm signal, which only the main thread may set."""
    answers = []
    worker = threading.Thread(target=lambda: answers.append(math_answer(r"\boxed{\frac{3}{4}}")))
    worker.start()
    worker.join()
    assert answers == ["0.75"]


def test_one_answer_in_a_vote():
    scorer = SelfConsistencyScorer({"default": get_extractor("math_verify")})
    responses = [r"$\frac12$", "0.5", "The answer is 1/2.", "0.25", "no idea"]
    scores = scorer.score_group(PromptContext("What is 1/4 + 1/4?", "math"), responses)
    assert scores == pytest.approx([0.6, 0.6, 0.6, 0.2, 0.0])


def test_labels_match_through_it():
    extract = get_extractor("math_verify")
    assert answer_matches(extract("So it is $\\frac{1}{2}$."), ["0.5"], extract)
    assert not answer_matches(extract("0.25"), ["1/2"], extract)


def test_it_is_a_name_settings_accept():
    settings = load_settings(overrides=["scoring.extractors.math='math_verify'"])
    assert settings.scoring.extractors["math"] == "math_verify"
    scorer = build_scorer(ScoringSettings(extractors={"default": "math_verify"}))
    assert scorer.score(PromptContext("1/4 + 1/4?", "algebra"), ["0.5", r"\frac12"]).scores == [1.0, 1.0]
    with pytest.raises(SettingsError, match="unknown answer extractor 'math_verifi'"):
        load_settings(overrides=["scoring.extractors.math='math_verifi'"])

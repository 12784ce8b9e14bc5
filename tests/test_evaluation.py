"""tao_pipeline.evaluation: challenger vs champion on held-out prompts, the summary and the verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.evaluation import (
    EVALUATION_COLUMNS,
    Contender,
    compare_control,
    decide,
    evaluate,
    summarize,
    tuned_vs_sampling_table,
    win_rate,
)
from tao_pipeline.scoring import build_scorer
from tao_pipeline.scoring.extractors import answer_matches
from tao_pipeline.settings import (
    EvaluationSettings,
    GenerationSettings,
    ModelSettings,
    ScoringSettings,
    TaoSettings,
)
from tests.helpers import build_tiny_model

EXPECTED_COLUMNS = (
    {"prompt_id", "task", "prompt", "outcome", "control_outcome", "base_version", "k", "base_sample_accuracy"}
    | {
        f"{side}_{name}"
        for side in ("champion", "challenger", "control")
        for name in ("version", "response", "answer", "score", "chars", "correct")
    }
    | {
        f"{method}_{name}"
        for method in ("base_greedy", "base_majority", "base_best_of_k")
        for name in ("answer", "correct")
    }
)


@pytest.fixture
def heldout():
    return pd.DataFrame(
        {
            "prompt_id": ["h1", "h2", "h3"],
            "prompt": [
                "What is 2 + 3? Reply with just the number.",
                "What is the capital of France?",
                "Name a colour.",
            ],
            "system": [np.nan, "You are a concise assistant.", None],
            "task": ["arithmetic", "short_answer", "short_answer"],
            "split": ["heldout"] * 3,
        }
    )


def tao_settings(tmp_path, model_dir) -> TaoSettings:
    return TaoSettings(
        home=tmp_path / "home",
        model=ModelSettings(base=str(model_dir), dtype="float32"),
        generation=GenerationSettings(batch_size=4, temperature=1.0),
        evaluation=EvaluationSettings(pool_samples=2, max_new_tokens=5),
    )


def test_evaluate_same_model_ties_everywhere(tiny_model_dir, tmp_path, heldout):
    settings = tao_settings(tmp_path, tiny_model_dir)
    labels = {"What is 2 + 3? Reply with just the number.": ["5"], "What is the capital of France?": ["Paris"]}
    scorer = build_scorer(ScoringSettings())
    rows = evaluate(
        heldout,
        Contender("base-tiny", tiny_model_dir),
        Contender("round-1-dpo", tiny_model_dir),
        scorer,
        labels,
        settings,
        progress=False,
    )
    assert len(rows) == len(heldout)
    assert set(rows.columns) == EXPECTED_COLUMNS
    assert rows["prompt_id"].tolist() == ["h1", "h2", "h3"]
    assert (rows["champion_version"] == "base-tiny").all()
    assert (rows["challenger_version"] == "round-1-dpo").all()
    # The same weights answer greedily the same way, so every prompt is a tie.
    assert rows["champion_response"].tolist() == rows["challenger_response"].tolist()
    assert (rows["outcome"] == "tie").all()
    assert rows["champion_score"].tolist() == rows["challenger_score"].tolist()
    assert rows["champion_score"].between(0.0, 1.0).all()
    assert rows["champion_chars"].tolist() == rows["champion_response"].str.len().tolist()
    # Labels only where given; the correctness agrees with answer_matches on the extracted answer.
    assert rows["champion_correct"].isna().tolist() == [False, False, True]
    for row in rows.iloc[:2].itertuples():
        extractor = scorer.consistency.extractor(row.task)
        expected = answer_matches(row.champion_answer, labels[row.prompt], extractor, row.prompt)
        assert row.champion_correct == expected == row.challenger_correct
    verdict = decide(rows, settings.evaluation)
    assert verdict.win_rate == 0.5
    assert verdict.promote is False  # a tie is no improvement


def test_evaluate_different_models(tiny_model_dir, tmp_path, heldout):
    other = build_tiny_model(tmp_path / "other-model", seed=1)
    settings = tao_settings(tmp_path, tiny_model_dir)
    rows = evaluate(
        heldout,
        Contender("base-tiny", tiny_model_dir),
        Contender("other", other),
        build_scorer(ScoringSettings()),
        {},
        settings,
        progress=False,
    )
    assert len(rows) == 3
    assert set(rows.columns) == EXPECTED_COLUMNS
    assert (rows["challenger_version"] == "other").all()
    assert set(rows["outcome"]) <= {"win", "loss", "tie"}
    for row in rows.itertuples():
        if abs(row.challenger_score - row.champion_score) < 1e-9:
            assert row.outcome == "tie"
        else:
            assert row.outcome == ("win" if row.challenger_score > row.champion_score else "loss")
    assert rows["champion_correct"].isna().all()


def test_evaluate_with_no_heldout_prompts(tiny_model_dir, tmp_path, heldout):
    # data.heldout_fraction=0 is a valid setting: the table must keep its columns and the verdict refuse.
    settings = tao_settings(tmp_path, tiny_model_dir)
    rows = evaluate(
        heldout.iloc[:0],
        Contender("a", tiny_model_dir),
        Contender("b", tiny_model_dir),
        build_scorer(ScoringSettings()),
        {},
        settings,
        progress=False,
    )
    assert rows.empty
    assert set(rows.columns) == EXPECTED_COLUMNS
    verdict = decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is False
    assert verdict.win_rate == 0.0


# -- win rate, summary, verdict ---------------------------------------------------------


@pytest.mark.parametrize(
    "outcomes, expected",
    [
        (["win", "win", "loss", "loss"], 0.5),
        (["win", "tie", "loss", "loss"], 0.375),
        (["tie", "tie"], 0.5),
        (["win"], 1.0),
        (["loss", "tie", "tie", "win", "win"], 0.6),
        ([], 0.0),
    ],
)
def test_win_rate(outcomes, expected):
    assert win_rate(pd.Series(outcomes, dtype=object)) == pytest.approx(expected)


def result_rows(outcomes, champion_correct=None, challenger_correct=None, tasks=None, **extra) -> pd.DataFrame:
    n = len(outcomes)
    frame = pd.DataFrame({column: [None] * n for column in EVALUATION_COLUMNS})
    return frame.assign(
        **{
            "prompt_id": [f"p{i}" for i in range(n)],
            "task": tasks or ["arithmetic"] * n,
            "outcome": outcomes,
            "champion_score": [0.5] * n,
            "challenger_score": [{"win": 1.0, "loss": 0.0, "tie": 0.5}[o] for o in outcomes],
            "champion_chars": [10] * n,
            "challenger_chars": [4] * n,
            "champion_correct": champion_correct if champion_correct is not None else [None] * n,
            "challenger_correct": challenger_correct if challenger_correct is not None else [None] * n,
            **extra,
        }
    )


def test_summarize_table():
    rows = result_rows(
        ["win", "win", "tie", "loss"],
        champion_correct=[True, False, None, None],
        challenger_correct=[True, True, None, None],
        tasks=["arithmetic", "arithmetic", "short_answer", "short_answer"],
    )
    table = summarize(rows)
    assert list(table.columns) == [
        "metric",
        "champion",
        "challenger",
        "difference",
        "champion_ci",
        "challenger_ci",
        "difference_ci",
        "control",
        "control_ci",
        "p_value",
        "n",
    ]
    assert table["control"].isna().all()  # no control arm in these rows
    by_metric = table.set_index("metric")
    assert table["metric"].tolist() == [
        "label-free score (all)",
        "labeled accuracy (all)",
        "challenger win rate (all)",
        "label-free score (arithmetic)",
        "labeled accuracy (arithmetic)",
        "challenger win rate (arithmetic)",
        "label-free score (short_answer)",
        "challenger win rate (short_answer)",
        "mean response chars",
        "median response chars",
        "90th percentile response chars",
    ]
    assert by_metric.loc["label-free score (all)", "champion"] == 0.5
    assert by_metric.loc["label-free score (all)", "challenger"] == pytest.approx(0.625)
    assert by_metric.loc["label-free score (all)", "difference"] == pytest.approx(0.125)
    assert by_metric.loc["labeled accuracy (all)", ["champion", "challenger", "n"]].tolist() == [0.5, 1.0, 2]
    assert by_metric.loc["labeled accuracy (all)", "p_value"] == "1"  # one discordant prompt proves nothing
    assert by_metric.loc["challenger win rate (all)", "challenger"] == pytest.approx(0.625)
    assert by_metric.loc["challenger win rate (all)", "n"] == 4
    assert by_metric.loc["challenger win rate (arithmetic)", "challenger"] == 1.0
    assert by_metric.loc["challenger win rate (short_answer)", "challenger"] == 0.25
    assert by_metric.loc["mean response chars", ["champion", "challenger"]].tolist() == [10.0, 4.0]
    # Every figure has its interval, and each interval holds its figure.
    for row in table.itertuples():
        for side in ("champion", "challenger", "difference"):
            value, interval = getattr(row, side), getattr(row, f"{side}_ci")
            if value == value and value is not None:
                low, high = (float(x) for x in interval.strip("[]").split(","))
                assert low <= value + 1e-9 and value <= high + 1e-9, (row.metric, side, value, interval)


def outcomes(wins: int, losses: int, ties: int) -> list[str]:
    return ["win"] * wins + ["loss"] * losses + ["tie"] * ties


DEFAULTS = EvaluationSettings()


def test_decide_promotes_a_proven_winner_with_its_evidence():
    verdict = decide(result_rows(outcomes(28, 4, 36)), DEFAULTS)  # the demo round's held-out outcomes
    assert verdict.promote is True and verdict.evidence == "significant"
    assert verdict.win_rate == pytest.approx(0.676, abs=1e-3)
    assert 0.5 < verdict.win_rate_low < verdict.win_rate < verdict.win_rate_high < 1.0
    assert (verdict.wins, verdict.losses, verdict.ties, verdict.heldout) == (28, 4, 36, 68)
    assert verdict.sign_test_p < 0.001 and verdict.confidence == 0.95
    assert verdict.champion_accuracy is None and verdict.challenger_accuracy is None
    assert "clears evaluation.min_win_rate=0.5" in verdict.reason and "[0.6" in verdict.reason


@pytest.mark.parametrize(
    "wins, losses, ties",
    [
        (3, 1, 0),  # ahead, far too few prompts
        (3, 0, 0),  # a clean sweep of three: the bootstrap sees no spread, the sign test p = 0.125
        (20, 14, 34),  # 0.544 on the demo's 68 prompts: noise
    ],
)
def test_decide_keeps_the_champion_without_enough_evidence(wins, losses, ties):
    verdict = decide(result_rows(outcomes(wins, losses, ties)), DEFAULTS)
    assert verdict.promote is False and verdict.not_enough_evidence
    assert verdict.win_rate > 0.5
    n = wins + losses + ties
    assert verdict.reason.startswith(f"not enough evidence (n = {n}, win rate")
    assert "The champion stays" in verdict.reason
    assert verdict.heldout_needed > n  # what it would take, printed
    assert f"about {verdict.heldout_needed} held-out prompts" in verdict.reason


def test_decide_refuses_below_the_bar_whatever_the_evidence():
    winning = result_rows(outcomes(60, 10, 0))
    assert decide(winning, DEFAULTS).promote is True
    above_bar = decide(winning, EvaluationSettings(min_win_rate=0.86))  # must exceed, not equal
    assert above_bar.promote is False and above_bar.evidence == "below the bar"
    assert "does not exceed evaluation.min_win_rate=0.86" in above_bar.reason
    ahead_not_proven = decide(winning, EvaluationSettings(min_win_rate=0.8))  # 0.857 > 0.8, interval is not
    assert ahead_not_proven.promote is False and ahead_not_proven.not_enough_evidence
    even = decide(result_rows(outcomes(30, 30, 8)), DEFAULTS)
    assert even.promote is False and "evaluation.min_win_rate" in even.reason


def test_a_bar_below_one_half_accepts_a_challenger_that_is_no_worse():
    # min_win_rate < 0.5 says "promote unless proven worse": all ties clear 0.0, no sign test applies.
    verdict = decide(result_rows(outcomes(0, 0, 6)), EvaluationSettings(min_win_rate=0.0))
    assert verdict.promote is True


def test_no_better_challengers_are_rarely_promoted():
    """The gate's error rate: a challenger exactly as good as the champion, 200 simulated rounds of 68 prompts."""
    rng = np.random.default_rng(7)
    promoted = sum(
        decide(result_rows(list(rng.choice(["win", "loss", "tie"], size=68, p=[0.3, 0.3, 0.4]))), DEFAULTS).promote
        for _ in range(200)
    )
    assert promoted <= 10, promoted  # at most ~2.5% expected; 10/200 would already be a broken gate
    # and a clearly better one (P(win) 0.45 vs P(loss) 0.15) is promoted most of the time
    better = sum(
        decide(result_rows(list(rng.choice(["win", "loss", "tie"], size=68, p=[0.45, 0.15, 0.4]))), DEFAULTS).promote
        for _ in range(50)
    )
    assert better >= 40, better


def test_decide_refuses_on_a_labeled_accuracy_drop():
    rows = result_rows(
        outcomes(40, 0, 0),
        champion_correct=[True] * 30 + [False] * 10,
        challenger_correct=[True] * 20 + [False] * 20,
    )
    verdict = decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is False and verdict.evidence == "guard"
    assert (verdict.champion_accuracy, verdict.challenger_accuracy) == (0.75, 0.5)
    assert "labeled accuracy fell: 0.750 -> 0.500" in verdict.reason and "McNemar p = 0.002" in verdict.reason
    assert verdict.accuracy_difference_high < 0  # a drop the interval is sure of
    assert decide(rows, EvaluationSettings(max_accuracy_drop=0.25)).promote is True  # within the allowed drop
    assert decide(rows, EvaluationSettings(max_accuracy_drop=0.2)).promote is False


def test_decide_ignores_unlabeled_rows_for_accuracy():
    rows = result_rows(
        outcomes(30, 5, 5),
        champion_correct=[False] + [None] * 39,
        challenger_correct=[True] + [None] * 39,
    )
    verdict = decide(rows, DEFAULTS)
    assert verdict.promote is True
    assert (verdict.champion_accuracy, verdict.challenger_accuracy) == (0.0, 1.0)
    assert "n = 1)" in verdict.reason


def test_decide_reports_mcnemar_on_labeled_prompts():
    # The demo round's labeled outcome: 1 prompt only the champion got right, 7 only the challenger.
    champion = [True] * 21 + [True] * 1 + [False] * 7 + [False] * 39
    challenger = [True] * 21 + [False] * 1 + [True] * 7 + [False] * 39
    verdict = decide(result_rows(outcomes(28, 4, 36), champion, challenger), DEFAULTS)
    assert verdict.promote is True
    assert verdict.mcnemar_p == pytest.approx(0.0703, abs=1e-4)  # exact: 2 * P(X <= 1 | 8, 0.5) = 18/256
    assert verdict.accuracy_difference_low < 6 / 68 < verdict.accuracy_difference_high
    assert "labeled accuracy 0.324 -> 0.412, difference +0.088" in verdict.reason


def test_evaluate_compares_base_sampling_and_the_control(tiny_model_dir, tmp_path, heldout):
    from collections import Counter

    from tao_pipeline.generation import GenerationCache, LazyGenerator, SamplingParams

    other = build_tiny_model(tmp_path / "other-model", seed=1)
    settings = tao_settings(tmp_path, tiny_model_dir)
    settings.evaluation.test_time_k = 4
    labels = {"What is 2 + 3? Reply with just the number.": ["5"], "What is the capital of France?": ["Paris"]}
    scorer = build_scorer(ScoringSettings())
    base = Contender("base-tiny", tiny_model_dir)
    rows = evaluate(
        heldout,
        base,
        Contender("tuned", other),
        scorer,
        labels,
        settings,
        progress=False,
        base=base,
        control=Contender("control-tuned", other),
    )
    assert set(rows.columns) == EXPECTED_COLUMNS and (rows["k"] == 4).all()
    assert (rows["base_version"] == "base-tiny").all()
    # The control here has the challenger's weights, so it answers and scores the same way.
    assert rows["control_response"].tolist() == rows["challenger_response"].tolist()
    assert rows["control_outcome"].tolist() == rows["outcome"].tolist()
    # The base is the champion: its pass@1 answer is the champion's greedy answer.
    assert rows["base_greedy_answer"].tolist() == rows["champion_answer"].tolist()
    # maj@k is the most common extracted answer of the k cached base samples (read back without a model).
    # The base is the champion, so its reference pool and its k samples are one draw: nothing generated twice.
    unloadable = LazyGenerator("base-tiny", lambda: pytest.fail("the base samples should all be cached"))
    drawn = max(settings.evaluation.pool_samples, 4)
    params = SamplingParams(
        drawn,
        settings.evaluation.max_new_tokens,
        temperature=settings.generation.temperature,
        top_p=settings.generation.top_p,
        seed=settings.generation.seed + 1,
    )
    cache = GenerationCache(
        settings.cache_dir, settings.generation.shard_prompts, settings.generation.max_prompt_tokens
    )
    samples, stats = cache.generate(unloadable, heldout, params, progress=False)
    assert stats.generated_prompts == 0 and len(samples) == drawn * len(heldout)
    assert len(list((settings.cache_dir / "generations" / "base-tiny").iterdir())) == 2  # greedy + one sample draw
    samples = samples[samples["sample_index"] < 4]
    for row in rows.itertuples():
        from tao_pipeline.scoring import PromptContext

        context = PromptContext(row.prompt, row.task)
        answers = scorer.answers(context, samples[samples["prompt_id"] == row.prompt_id]["response"].tolist())
        votes = Counter(a for a in answers if a is not None)
        expected = votes.most_common(1)[0][0] if votes else None
        assert row.base_majority_answer == expected or (expected is None and pd.isna(row.base_majority_answer))
    assert rows["base_majority_correct"].isna().tolist() == [False, False, True]
    assert rows["base_sample_accuracy"].isna().tolist() == [False, False, True]
    assert rows["base_sample_accuracy"].dropna().between(0, 1).all()


def test_evaluate_skips_base_sampling_when_k_is_zero(tiny_model_dir, tmp_path, heldout):
    settings = tao_settings(tmp_path, tiny_model_dir)
    settings.evaluation.test_time_k = 0
    rows = evaluate(
        heldout,
        Contender("a", tiny_model_dir),
        Contender("b", tiny_model_dir),
        build_scorer(ScoringSettings()),
        {},
        settings,
        progress=False,
    )
    assert rows["base_majority_answer"].isna().all() and rows["control_response"].isna().all()


def _labeled(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return result_rows(["win"] * n, tasks=["arithmetic", "arithmetic", "short_answer", "short_answer"][:n], **columns)


def test_tuned_vs_sampling_table_says_whether_one_tuned_pass_reaches_maj_at_k():
    rows = _labeled(
        base_greedy_correct=[True, False, False, False],
        base_majority_correct=[True, True, False, False],
        base_best_of_k_correct=[True, True, True, False],
        champion_correct=[True, False, False, False],
        challenger_correct=[True, True, False, True],
        control_correct=[True, False, False, False],
    )
    table = tuned_vs_sampling_table(rows).set_index("task")
    assert table.loc[
        "all", ["base pass@1", "base maj@k", "base best-of-k", "tuned greedy", "control greedy"]
    ].tolist() == [0.25, 0.5, 0.75, 0.75, 0.25]
    assert table.loc["arithmetic", "tuned_reaches_majority"] and table.loc["short_answer", "tuned_reaches_majority"]
    rows["challenger_correct"] = [True, False, False, False]
    table = tuned_vs_sampling_table(rows).set_index("task")
    assert not table.loc["all", "tuned_reaches_majority"] and not table.loc["arithmetic", "tuned_reaches_majority"]


def test_without_base_sampling_the_table_still_compares_champion_and_tuned_per_task():
    rows = _labeled(champion_correct=[True, False, False, False], challenger_correct=[True, True, False, True])
    table = tuned_vs_sampling_table(rows).set_index("task")
    assert table.loc[["all", "arithmetic", "short_answer"], "tuned greedy"].tolist() == [0.75, 1.0, 0.5]
    assert table["champion greedy"].tolist() == [0.25, 0.5, 0.0] and table["base maj@k"].isna().all()
    assert table["tuned_reaches_majority"].isna().all()  # no maj@k to reach


def test_control_alarm_when_random_directions_gain_as_much():
    settings = EvaluationSettings(control_margin=0.02)
    base = {"champion_correct": [True, False, False, False], "challenger_correct": [True, True, True, False]}
    fine = compare_control(
        _labeled(**base, control_correct=[True, False, False, False], control_response=["x"] * 4), settings
    )
    assert fine.enabled and not fine.alarm and (fine.tao_gain, fine.control_gain) == (0.5, 0.0)
    loud = compare_control(
        _labeled(**base, control_correct=[True, True, True, False], control_response=["x"] * 4), settings
    )
    assert loud.alarm and "CONTROL GAINS AS MUCH AS TAO" in loud.message
    off = compare_control(_labeled(**base), settings)
    assert not off.enabled and not off.alarm and "evaluation.control_arm" in off.message


def test_control_without_labels_compares_win_rates():
    rows = result_rows(
        ["win", "win", "win", "loss"], control_outcome=["win", "loss", "loss", "tie"], control_response=["x"] * 4
    )
    verdict = compare_control(rows, EvaluationSettings())
    assert verdict.measure == "label-free win rate" and not verdict.alarm
    assert verdict.tao_gain == 0.25 and verdict.control_gain == pytest.approx(-0.125, abs=1e-3)


def test_the_paired_accuracy_interval_agrees_with_mcnemar_when_few_prompts_differ():
    from tao_pipeline.evaluation.significance import accuracy_test

    # Three prompts only the challenger gets right, none the other way, on 68: McNemar finds nothing,
    # and the interval must not claim more (a bootstrap of the differences would exclude 0 here).
    champion, challenger = [False] * 68, [True] * 3 + [False] * 65
    test = accuracy_test(champion, challenger, 0.95)
    assert test.mcnemar_p == pytest.approx(0.25)
    assert test.difference == pytest.approx(3 / 68)
    assert test.difference_interval.low < 0 < test.difference < test.difference_interval.high
    # Identical answers: a symmetric interval around 0; a large one-sided change: an interval above 0.
    same = accuracy_test([True] * 20 + [False] * 48, [True] * 20 + [False] * 48, 0.95).difference_interval
    assert same.low == pytest.approx(-same.high) and same.low < 0
    better = accuracy_test([False] * 68, [True] * 15 + [False] * 53, 0.95)
    assert better.mcnemar_p < 0.001 and 0 < better.difference_interval.low < 15 / 68 < better.difference_interval.high

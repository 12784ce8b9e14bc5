"""tao_pipeline.evaluation: challenger vs champion on held-out prompts, the summary and the verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.helpers import build_tiny_model
from tao_pipeline.evaluation import Contender, decide, evaluate, summarize, win_rate
from tao_pipeline.scoring import build_scorer
from tao_pipeline.scoring.extractors import answer_matches
from tao_pipeline.settings import (
    EvaluationSettings,
    GenerationSettings,
    ModelSettings,
    ScoringSettings,
    TaoSettings,
)

SIDES = ("champion", "challenger")
EXPECTED_COLUMNS = {"prompt_id", "task", "prompt", "outcome"} | {
    f"{side}_{name}" for side in SIDES for name in ("version", "response", "answer", "score", "chars", "correct")
}


@pytest.fixture
def heldout():
    return pd.DataFrame({
        "prompt_id": ["h1", "h2", "h3"],
        "prompt": ["What is 2 + 3? Reply with just the number.", "What is the capital of France?",
                   "Name a colour."],
        "system": [np.nan, "You are a concise assistant.", None],
        "task": ["arithmetic", "short_answer", "short_answer"],
        "split": ["heldout"] * 3,
    })


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
    rows = evaluate(heldout, Contender("base-tiny", tiny_model_dir), Contender("round-1-dpo", tiny_model_dir),
                    scorer, labels, settings, progress=False)
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
    rows = evaluate(heldout, Contender("base-tiny", tiny_model_dir), Contender("other", other),
                    build_scorer(ScoringSettings()), {}, settings, progress=False)
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
    rows = evaluate(heldout.iloc[:0], Contender("a", tiny_model_dir), Contender("b", tiny_model_dir),
                    build_scorer(ScoringSettings()), {}, settings, progress=False)
    assert rows.empty
    assert set(rows.columns) == EXPECTED_COLUMNS
    verdict = decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is False
    assert verdict.win_rate == 0.0


# -- win rate, summary, verdict ---------------------------------------------------------


@pytest.mark.parametrize("outcomes, expected", [
    (["win", "win", "loss", "loss"], 0.5),
    (["win", "tie", "loss", "loss"], 0.375),
    (["tie", "tie"], 0.5),
    (["win"], 1.0),
    (["loss", "tie", "tie", "win", "win"], 0.6),
    ([], 0.0),
])
def test_win_rate(outcomes, expected):
    assert win_rate(pd.Series(outcomes, dtype=object)) == pytest.approx(expected)


def result_rows(outcomes, champion_correct=None, challenger_correct=None, tasks=None) -> pd.DataFrame:
    n = len(outcomes)
    return pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)],
        "task": tasks or ["arithmetic"] * n,
        "outcome": outcomes,
        "champion_score": [0.5] * n,
        "challenger_score": [{"win": 1.0, "loss": 0.0, "tie": 0.5}[o] for o in outcomes],
        "champion_chars": [10] * n,
        "challenger_chars": [4] * n,
        "champion_correct": champion_correct if champion_correct is not None else [None] * n,
        "challenger_correct": challenger_correct if challenger_correct is not None else [None] * n,
    })


def test_summarize_table():
    rows = result_rows(
        ["win", "win", "tie", "loss"],
        champion_correct=[True, False, None, None], challenger_correct=[True, True, None, None],
        tasks=["arithmetic", "arithmetic", "short_answer", "short_answer"],
    )
    table = summarize(rows)
    assert list(table.columns) == ["metric", "champion", "challenger", "n"]
    by_metric = table.set_index("metric")
    assert table["metric"].tolist() == [
        "label-free score (all)", "labeled accuracy (all)", "challenger win rate (all)",
        "label-free score (arithmetic)", "labeled accuracy (arithmetic)", "challenger win rate (arithmetic)",
        "label-free score (short_answer)", "challenger win rate (short_answer)",
        "mean response chars",
    ]
    assert by_metric.loc["label-free score (all)", "champion"] == 0.5
    assert by_metric.loc["label-free score (all)", "challenger"] == pytest.approx(0.625)
    assert by_metric.loc["labeled accuracy (all)", ["champion", "challenger", "n"]].tolist() == [0.5, 1.0, 2]
    assert by_metric.loc["challenger win rate (all)", "challenger"] == pytest.approx(0.625)
    assert by_metric.loc["challenger win rate (all)", "n"] == 4
    assert by_metric.loc["challenger win rate (arithmetic)", "challenger"] == 1.0
    assert by_metric.loc["challenger win rate (short_answer)", "challenger"] == 0.25
    assert by_metric.loc["mean response chars", ["champion", "challenger"]].tolist() == [10.0, 4.0]


def test_decide_promotes_only_above_the_min_win_rate():
    winning = result_rows(["win", "win", "win", "loss"])
    verdict = decide(winning, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is True
    assert verdict.win_rate == 0.75
    assert verdict.champion_accuracy is None and verdict.challenger_accuracy is None
    assert decide(winning, EvaluationSettings(min_win_rate=0.75, max_accuracy_drop=0.0)).promote is False  # must exceed, not equal
    even = decide(result_rows(["win", "loss", "tie", "tie"]), EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert even.promote is False
    assert "evaluation.min_win_rate" in even.reason


def test_decide_refuses_on_a_labeled_accuracy_drop():
    rows = result_rows(["win", "win", "win", "win"],
                       champion_correct=[True, True, True, False], challenger_correct=[True, True, False, False])
    verdict = decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is False
    assert (verdict.champion_accuracy, verdict.challenger_accuracy) == (0.75, 0.5)
    assert "accuracy" in verdict.reason
    assert decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.25)).promote is True  # within the allowed drop
    assert decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.2)).promote is False


def test_decide_ignores_unlabeled_rows_for_accuracy():
    rows = result_rows(["win", "win", "win", "loss"],
                       champion_correct=[False, None, None, None], challenger_correct=[True, None, None, None])
    verdict = decide(rows, EvaluationSettings(min_win_rate=0.5, max_accuracy_drop=0.0))
    assert verdict.promote is True
    assert (verdict.champion_accuracy, verdict.challenger_accuracy) == (0.0, 1.0)

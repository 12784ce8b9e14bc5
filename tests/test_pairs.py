"""tao_pipeline.pairs: best vs worst candidate per prompt, with margins and deterministic ties."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.training.pairs import PAIR_COLUMNS, build_pairs


def tables(groups: dict[str, list[tuple[str, str, float]]], tasks: dict[str, str] | None = None):
    """groups: prompt_id -> [(response_id, response, score)] -> (prompts, candidates, scores)."""
    prompts = pd.DataFrame(
        {
            "prompt_id": list(groups),
            "prompt": [f"Question {pid}?" for pid in groups],
            "system": [np.nan if i % 2 else "Be brief." for i in range(len(groups))],
            "task": [(tasks or {}).get(pid, "arithmetic") for pid in groups],
        }
    )
    candidates = pd.DataFrame(
        [
            {"response_id": rid, "prompt_id": pid, "response": text}
            for pid, rows in groups.items()
            for rid, text, _ in rows
        ]
    )
    scores = pd.DataFrame(
        [
            {"response_id": rid, "prompt_id": pid, "score": score}
            for pid, rows in groups.items()
            for rid, _, score in rows
        ]
    )
    return prompts, candidates, scores


def test_chosen_is_best_and_rejected_is_worst():
    prompts, candidates, scores = tables(
        {
            "p1": [("a", "5", 0.5), ("b", "It is 5", 1.0), ("c", "6", 0.0), ("d", "7", 0.25)],
        },
        tasks={"p1": "arithmetic"},
    )
    pairs, stats = build_pairs(prompts, candidates, scores, min_margin=0.25)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    assert (pair["chosen_response_id"], pair["rejected_response_id"]) == ("b", "c")
    assert (pair["chosen"], pair["rejected"]) == ("It is 5", "6")
    assert (pair["chosen_score"], pair["rejected_score"], pair["margin"]) == (1.0, 0.0, 1.0)
    assert pair["prompt_id"] == "p1"
    assert pair["prompt"] == "Question p1?"
    assert pair["system"] == "Be brief."
    assert pair["task"] == "arithmetic"
    assert stats.prompts == 1 and stats.pairs == 1
    assert stats.dropped == {"all_equal": 0, "below_margin": 0, "single_candidate": 0, "unscored": 0}


def test_lineage_ids():
    prompts, candidates, scores = tables(
        {
            "p1": [("r-hi", "yes", 0.9), ("r-lo", "no", 0.1)],
            "p2": [("s-hi", "up", 0.8), ("s-lo", "down", 0.2)],
        }
    )
    pairs, _ = build_pairs(prompts, candidates, scores, min_margin=0.1)
    assert pairs["prompt_id"].tolist() == ["p1", "p2"]
    assert pairs["pair_id"].tolist() == [content_hash("r-hi", "r-lo"), content_hash("s-hi", "s-lo")]
    assert pairs["pair_id"].is_unique
    assert set(pairs["chosen_response_id"]) <= set(candidates["response_id"])
    assert set(pairs["rejected_response_id"]) <= set(candidates["response_id"])
    assert pairs["system"].isna().tolist() == [False, True]


def test_all_equal_and_below_margin_groups_are_dropped_and_counted():
    prompts, candidates, scores = tables(
        {
            "equal": [("e1", "a", 0.5), ("e2", "b", 0.5), ("e3", "c", 0.5)],
            "close": [("c1", "a", 0.6), ("c2", "b", 0.5)],
            "edge": [("g1", "a", 0.75), ("g2", "b", 0.5)],  # margin == min_margin is kept
            "clear": [("k1", "a", 1.0), ("k2", "b", 0.0)],
            "alone": [("s1", "a", 1.0)],
        }
    )
    pairs, stats = build_pairs(prompts, candidates, scores, min_margin=0.25)
    assert sorted(pairs["prompt_id"]) == ["clear", "edge"]
    assert stats.prompts == 5
    assert stats.pairs == 2
    assert stats.dropped == {"all_equal": 1, "below_margin": 1, "single_candidate": 1, "unscored": 0}


def test_zero_margin_still_drops_all_equal_groups():
    prompts, candidates, scores = tables(
        {
            "equal": [("e1", "a", 0.0), ("e2", "b", 0.0)],
            "tiny": [("t1", "a", 0.51), ("t2", "b", 0.5)],
        }
    )
    pairs, stats = build_pairs(prompts, candidates, scores, min_margin=0.0)
    assert pairs["prompt_id"].tolist() == ["tiny"]
    assert pairs.iloc[0]["margin"] == pytest.approx(0.01)
    assert stats.dropped["all_equal"] == 1


def test_ties_prefer_the_shorter_chosen_and_the_longer_rejected():
    prompts, candidates, scores = tables(
        {
            "p": [
                ("z-best-long", "five, definitely five", 1.0),
                ("y-best-short", "5", 1.0),
                ("b-worst-short", "x", 0.0),
                ("c-worst-long", "I really do not know", 0.0),
            ],
        }
    )
    pair = build_pairs(prompts, candidates, scores, min_margin=0.5)[0].iloc[0]
    assert pair["chosen_response_id"] == "y-best-short"
    assert pair["rejected_response_id"] == "c-worst-long"


def test_full_ties_break_on_response_id_regardless_of_row_order():
    rows = [("r3", "aa", 1.0), ("r1", "bb", 1.0), ("r2", "cc", 1.0), ("r9", "dd", 0.0), ("r7", "ee", 0.0)]
    results = set()
    for order in (rows, rows[::-1], rows[2:] + rows[:2]):
        prompts, candidates, scores = tables({"p": order})
        pair = build_pairs(prompts, candidates, scores, min_margin=0.5)[0].iloc[0]
        results.add((pair["chosen_response_id"], pair["rejected_response_id"], pair["pair_id"]))
    assert results == {("r1", "r7", content_hash("r1", "r7"))}


def test_scores_join_on_response_id_only():
    prompts, candidates, scores = tables({"p": [("a", "x", 0.0), ("b", "y", 1.0)]})
    shuffled = scores.iloc[::-1].reset_index(drop=True)  # order of the score table does not matter
    pair = build_pairs(prompts, candidates, shuffled, min_margin=0.5)[0].iloc[0]
    assert (pair["chosen_response_id"], pair["rejected_response_id"]) == ("b", "a")


def test_only_dropped_groups_give_an_empty_table_with_columns():
    prompts, candidates, scores = tables({"p": [("a", "x", 0.5), ("b", "y", 0.5)]})
    pairs, stats = build_pairs(prompts, candidates, scores, min_margin=0.0)
    assert pairs.empty
    assert list(pairs.columns) == PAIR_COLUMNS
    assert stats.pairs == 0 and stats.prompts == 1

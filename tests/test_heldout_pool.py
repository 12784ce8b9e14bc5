"""The held-out pool: every verdict evaluates on every round's held-out prompts so far, each once, newest first."""

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.data.lake import Lake
from tao_pipeline.data.prompts import split_for
from tao_pipeline.evaluation import decide
from tao_pipeline.evaluation.pooling import PROMPTS_TABLE, heldout_prompts
from tao_pipeline.settings import DataSettings, EvaluationSettings
from tests.test_evaluation import result_rows

DATA = DataSettings()


def _ids(split: str, count: int, start: int = 0) -> list[str]:
    """Prompt ids the default split puts in ``split`` (a prompt's split is a hash of its id)."""
    found, i = [], start
    while len(found) < count:
        if split_for(f"p{i}", DATA.heldout_fraction, DATA.split_salt) == split:
            found.append(f"p{i}")
        i += 1
    return found


HELD, TRAIN = _ids("heldout", 12), _ids("train", 4)


def _prompts(held: list[str], train: list[str]) -> pd.DataFrame:
    ids = held + train
    return pd.DataFrame({"prompt_id": ids, "split": ["heldout"] * len(held) + ["train"] * len(train), "text": ids})


@pytest.fixture
def lake(tmp_path) -> Lake:
    """Three earlier rounds, whatever their verdicts: round 2 repeats a prompt of round 1."""
    lake = Lake(tmp_path)
    lake.write(PROMPTS_TABLE, "round-0001", _prompts(HELD[0:3], TRAIN[0:1]))
    lake.write(PROMPTS_TABLE, "round-0002", _prompts([HELD[2], *HELD[3:5]], TRAIN[1:2]))
    lake.write(PROMPTS_TABLE, "round-0003", _prompts(HELD[5:7], TRAIN[2:3]))
    return lake


def test_a_verdict_pools_every_earlier_rounds_heldout_prompts_newest_first_each_once(lake):
    own = _prompts(HELD[7:9], TRAIN[3:4])
    pool = heldout_prompts(lake, "round-0004", own, DATA, pool=True, limit=None)
    assert pool.prompts["prompt_id"].tolist() == [*HELD[7:9], *HELD[5:7], HELD[2], *HELD[3:5], *HELD[0:2]]
    assert pool.own == 2 and pool.pooled_from == ["round-0003", "round-0002", "round-0001"]
    assert set(pool.prompts["split"]) == {"heldout"}  # a training prompt is never pooled
    assert list(pool.prompts.columns) == list(own.columns)
    assert "2 of this round's own + 7 from 3 earlier rounds" in pool.describe()
    # A rerun of an earlier round pools only the rounds before it, never a later one.
    rerun = heldout_prompts(lake, "round-0002", lake.read(PROMPTS_TABLE, "round-0002"), DATA, pool=True, limit=None)
    assert rerun.pooled_from == ["round-0001"] and rerun.prompts["prompt_id"].tolist() == [
        HELD[2],
        *HELD[3:5],
        *HELD[0:2],
    ]


def test_the_pool_stops_at_its_limit_keeping_this_rounds_own_and_the_newest(lake):
    own = _prompts(HELD[7:9], [])
    pool = heldout_prompts(lake, "round-0004", own, DATA, pool=True, limit=5)
    assert pool.prompts["prompt_id"].tolist() == [*HELD[7:9], *HELD[5:7], HELD[2]]
    assert pool.pooled_from == ["round-0003", "round-0002"]  # round 1 was never read
    assert heldout_prompts(lake, "round-0004", own, DATA, pool=True, limit=1).prompts["prompt_id"].tolist() == HELD[7:8]
    alone = heldout_prompts(lake, "round-0004", own, DATA, pool=False, limit=None)
    assert alone.prompts["prompt_id"].tolist() == HELD[7:9] and alone.pooled_from == []
    assert alone.describe() == "2 of this round's own (no earlier round's)"


def test_a_prompt_todays_split_puts_in_training_is_not_pooled(lake):
    """After data.heldout_fraction or split_salt changed, an earlier round's held-out prompt may be a training
    prompt now: the challenger could have trained on it, so it stays out of the pool."""
    resalted = DataSettings(split_salt="another")
    still_held = [pid for pid in HELD[0:7] if split_for(pid, resalted.heldout_fraction, "another") == "heldout"]
    pool = heldout_prompts(lake, "round-0004", _prompts([], []), resalted, pool=True, limit=None)
    assert sorted(pool.prompts["prompt_id"]) == sorted(still_held)
    assert len(still_held) < 7  # the salt changed the split of some of them


def _promoted(rounds: int, size: int, win: float, loss: float, rng) -> int:
    gate = EvaluationSettings()
    draws = (rng.choice(["win", "loss", "tie"], size=size, p=[win, loss, 1 - win - loss]) for _ in range(rounds))
    return sum(decide(result_rows(list(outcomes)), gate).promote for outcomes in draws)


@pytest.mark.parametrize("pool_size", [68, 200, 512])
def test_a_challenger_no_better_is_rarely_promoted_on_a_pool_of_any_size(pool_size):
    """200 simulated null rounds per pool size: false promotions stay within 5% as the pool grows."""
    promoted = _promoted(200, pool_size, 0.25, 0.25, np.random.default_rng(pool_size))
    assert promoted <= 10, f"{promoted} of 200 null rounds promoted on {pool_size} prompts"


def test_a_small_step_the_rounds_own_prompts_miss_is_seen_on_the_pool():
    """Two tuned models mostly tie: a challenger winning 12% and losing 8% of prompts is rarely proven on one
    round's 68 held-out prompts, and usually on a pool of 512."""
    rng = np.random.default_rng(3)
    alone, pooled = _promoted(100, 68, 0.12, 0.08, rng), _promoted(100, 512, 0.12, 0.08, rng)
    assert alone <= 25 and pooled >= 50 and pooled > 2 * alone, (alone, pooled)

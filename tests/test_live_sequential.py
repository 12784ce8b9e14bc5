"""The live decision's confidence sequence: valid however often it is checked, and decisive when it should be."""

import numpy as np
import pytest

from tao_pipeline.common.confidence_sequence import RunningBounds
from tao_pipeline.live.sequential import CONTINUE, PROMOTE, ROLL_BACK, advantage_bounds, decide, first_decision

SETTINGS = {"margin": 0.02, "confidence": 0.95, "min_pairs": 20}


def _streams(rng, mean: float, count: int, length: int) -> np.ndarray:
    """Paired differences in {-1, 0, 1} with the given mean: each challenger and champion answer right or wrong."""
    up = (1 + mean) / 2 * 0.6  # P(+1); P(-1) = up - mean; the rest ties
    down = up - mean
    draws = rng.random((count, length))
    return np.where(draws < up, 1.0, np.where(draws < up + down, -1.0, 0.0))


@pytest.mark.parametrize("true_mean", [-0.02, -0.04])
def test_checked_after_every_answer_a_challenger_worse_by_the_margin_is_promoted_at_most_2_5_percent(true_mean):
    """The promote error at any stopping time: 400 streams of 3,000 pairs, looked at after every single one."""
    streams = _streams(np.random.default_rng(7), true_mean, 400, 3000)
    n = np.arange(1, 3001)
    ever_promoted = np.array(
        [((advantage_bounds(s, 0.05)[0] > -SETTINGS["margin"]) & (n >= SETTINGS["min_pairs"])).any() for s in streams]
    )
    assert ever_promoted.mean() <= 0.025 + 0.02  # the bound plus sampling slack for 400 streams
    assert all(first_decision(s, **SETTINGS).decision != PROMOTE for s in streams[~ever_promoted][:20])


def test_a_better_challenger_is_promoted_and_a_worse_one_rolled_back_quickly():
    rng = np.random.default_rng(3)
    better = first_decision(_streams(rng, 0.15, 1, 3000)[0], **SETTINGS)
    worse = first_decision(_streams(rng, -0.3, 1, 3000)[0], **SETTINGS)
    assert better.decision == PROMOTE and better.low > -0.02 and better.n < 1000
    assert worse.decision == ROLL_BACK and worse.high < -0.02 and worse.n < 300
    assert "proven worse by more than 0.02" in worse.reason and "always valid" in worse.reason


def test_no_decision_before_min_pairs_and_on_bad_input():
    assert decide([], **SETTINGS).decision == CONTINUE
    early = decide([-1.0] * 10, **SETTINGS)
    assert early.decision == CONTINUE and "waiting for live.min_pairs=20" in early.reason
    with pytest.raises(ValueError, match=r"within \[-1, 1\]"):
        decide([0.5, 2.0], **SETTINGS)
    with pytest.raises(ValueError, match="finite"):
        decide([0.5, float("nan")], **SETTINGS)


def test_the_interval_narrows_with_evidence_and_with_ties():
    rng = np.random.default_rng(5)
    noisy = _streams(rng, 0.0, 1, 4000)[0]
    low, high = advantage_bounds(noisy, 0.05)
    widths = (high - low)[[9, 99, 999, 3999]]
    assert np.all(np.diff(widths) < 0) and low[-1] < 0 < high[-1]
    ties = decide([0.0] * 2000, **SETTINGS)  # two versions that always agree: no worse, and soon known
    assert ties.low < 0 < ties.high and ties.decision == PROMOTE


def test_the_running_bounds_are_the_whole_sequences_one_step_at_a_time():
    """tao serve's error guard keeps the interval pair by pair (constant time and memory per request)."""
    rng = np.random.default_rng(7)
    for differences in (rng.integers(-1, 2, 400).astype(float), rng.uniform(-1, 1, 200), np.ones(30), np.zeros(50)):
        lows, highs = advantage_bounds(differences, 0.05)
        running = RunningBounds(0.05)
        for i, difference in enumerate(differences):
            running.add(difference)
            assert running.n == i + 1
            assert running.low == pytest.approx(lows[i], abs=1e-12)
            assert running.high == pytest.approx(highs[i], abs=1e-12)


def test_an_experiment_undecided_after_max_pairs_is_rolled_back_never_promoted():
    """A challenger worse by about the margin keeps the test undecided; at live.max_pairs it ends, rolled back."""
    stream = _streams(np.random.default_rng(3), -0.02, 1, 600)[0]
    assert decide(stream, **SETTINGS).decision == CONTINUE  # no bound: still undecided after 600 pairs
    ended = decide(stream, **SETTINGS, max_pairs=500)
    assert ended.decision == ROLL_BACK and ended.n == 600
    assert "no decision after live.max_pairs=500 pairs, not proven no worse than -0.02" in ended.reason
    assert ended.reason.startswith("advantage ")  # the interval it ended on, as every verdict gives it
    assert decide(stream[:400], **SETTINGS, max_pairs=500).decision == CONTINUE
    better = _streams(np.random.default_rng(4), 0.3, 1, 600)[0]
    assert decide(better, **SETTINGS, max_pairs=500).decision == PROMOTE  # a decision stands, bound or not
    assert decide(stream[:10], **SETTINGS, max_pairs=5).decision == CONTINUE  # min_pairs comes first


def test_an_experiment_undecided_after_max_hours_is_rolled_back_whatever_its_pairs():
    stream = _streams(np.random.default_rng(3), -0.02, 1, 600)[0]
    assert decide(stream, **SETTINGS, hours=71.9, max_hours=72).decision == CONTINUE
    ended = decide(stream, **SETTINGS, hours=72.0, max_hours=72)
    assert ended.decision == ROLL_BACK and "no decision 72.0 h after it started (live.max_hours=72)" in ended.reason
    assert decide(stream[:3], **SETTINGS, hours=80, max_hours=72).decision == ROLL_BACK  # before min_pairs too
    assert decide([], **SETTINGS, hours=80, max_hours=72).decision == ROLL_BACK  # and with no traffic at all
    better = _streams(np.random.default_rng(4), 0.3, 1, 600)[0]
    assert decide(better, **SETTINGS, hours=80, max_hours=72).decision == PROMOTE  # a decision stands

"""How sure a held-out comparison is: intervals, paired tests, and the sample size a conclusion needs.

- :func:`win_rate_test`: the challenger's label-free win rate (ties count half) with a bootstrap
  interval, and a one-sided sign test of wins against losses (ties carry no information about
  which model is better, so the exact binomial test leaves them out);
- :func:`accuracy_test`: labeled accuracy of both models with Wilson intervals, and the paired
  difference with Newcombe's interval and McNemar's exact test on the discordant prompts;
- :func:`mean_interval`: a bootstrap interval for any per-prompt figure (score, length, quantiles);
- :func:`required_heldout`: how many held-out prompts would show an effect of a given size.

Every bootstrap is seeded, so the same rows always give the same verdict. scipy is imported by the
functions that use it: the code location imports this module, and every process that loads it (each
Dagster run, the code server) would otherwise pay for scipy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 4999
BOOTSTRAP_SEED = 0
POWER = 0.8  # the chance of detecting a real effect of the stated size, for the sample size printed


@dataclass(frozen=True)
class Interval:
    low: float | None
    high: float | None
    confidence: float

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return "[-]"
        return f"[{self.low:.3f}, {self.high:.3f}]"

    @property
    def percent(self) -> str:
        return f"{self.confidence:.0%}"


def _unknown(confidence: float) -> Interval:
    return Interval(None, None, confidence)


def mean_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float,
    statistic: Callable[..., float] = np.mean,
) -> Interval:
    """Bootstrap (BCa, percentile where BCa is undefined) interval of ``statistic`` over per-prompt values."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    data = data[~np.isnan(data)]
    if len(data) == 0:
        return _unknown(confidence)
    if len(data) == 1 or np.all(data == data[0]):
        # No spread to resample: the interval is the value itself (small n is caught by the tests, not here).
        value = float(statistic(data))
        return Interval(value, value, confidence)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                (data,),
                statistic,
                confidence_level=confidence,
                n_resamples=BOOTSTRAP_RESAMPLES,
                method=method,
                rng=BOOTSTRAP_SEED,
            )
        low, high = result.confidence_interval
        if not (math.isnan(low) or math.isnan(high)):
            return Interval(round(float(low), 4), round(float(high), 4), confidence)
    return _unknown(confidence)


def proportion_interval(successes: int, n: int, confidence: float) -> Interval:
    """Wilson score interval: sound for small n and for proportions near 0 or 1."""
    from scipy import stats

    if n == 0:
        return _unknown(confidence)
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(round(float(ci.low), 4), round(float(ci.high), 4), confidence)


def required_heldout(spread: float, effect: float, confidence: float, power: float = POWER) -> int:
    """Held-out prompts needed to detect a mean shift of ``effect`` in per-prompt values of standard
    deviation ``spread`` (one-sided, at ``confidence``'s two-sided error split as the intervals split it)."""
    from scipy import stats

    if effect <= 0:
        return 0
    alpha = (1 - confidence) / 2
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    return math.ceil((z * max(spread, 1e-6) / effect) ** 2)


@dataclass(frozen=True)
class WinRateTest:
    wins: int
    losses: int
    ties: int
    win_rate: float
    interval: Interval
    sign_test_p: float  # one-sided: P(at least this many wins among decisive prompts | no better)

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def counts(self) -> str:
        return f"{self.wins} wins, {self.losses} losses, {self.ties} ties"


def win_scores(outcomes) -> np.ndarray:
    """Per-prompt win score for the challenger: win 1, tie 0.5, loss 0; unknown outcomes left out."""
    points = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    return np.array([points[o] for o in outcomes if o in points], dtype=float)


def win_rate_test(outcomes, confidence: float) -> WinRateTest:
    from scipy import stats

    scores = win_scores(outcomes)
    wins, losses = int((scores == 1.0).sum()), int((scores == 0.0).sum())
    ties = len(scores) - wins - losses
    rate = float(scores.mean()) if len(scores) else 0.0
    p = stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return WinRateTest(wins, losses, ties, rate, mean_interval(scores, confidence), float(p))


def win_rate_heldout_needed(test: WinRateTest, bar: float, confidence: float, min_effect: float = 0.05) -> int:
    """Held-out prompts that would show the observed win rate (or ``bar + min_effect``, whichever is
    higher) clearing the bar: what to pool or collect before the next verdict."""
    scores_sd = _win_rate_spread(test)
    effect = max(test.win_rate - bar, min_effect)
    return required_heldout(scores_sd, effect, confidence)


def _win_rate_spread(test: WinRateTest) -> float:
    if test.n < 2:
        return 0.5  # the largest spread a win score can have: a safe guess before any data
    scores = np.array([1.0] * test.wins + [0.0] * test.losses + [0.5] * test.ties)
    return float(scores.std(ddof=1)) or 0.5


@dataclass(frozen=True)
class AccuracyTest:
    n: int
    champion: float
    challenger: float
    champion_interval: Interval
    challenger_interval: Interval
    difference_interval: Interval
    champion_only: int  # prompts the champion got right and the challenger wrong
    challenger_only: int
    mcnemar_p: float  # two-sided exact McNemar (a binomial test on the discordant prompts)

    @property
    def difference(self) -> float:
        return self.challenger - self.champion


def accuracy_test(champion_correct, challenger_correct, confidence: float) -> AccuracyTest | None:
    """Paired labeled accuracy on the prompts both models were checked on; None without labels."""
    from scipy import stats

    pairs = [
        (bool(a), bool(b))
        for a, b in zip(champion_correct, challenger_correct, strict=True)
        if a is not None and b is not None and a == a and b == b
    ]
    if not pairs:
        return None
    champion = np.array([a for a, _ in pairs], dtype=float)
    challenger = np.array([b for _, b in pairs], dtype=float)
    champion_only = int(((champion == 1) & (challenger == 0)).sum())
    challenger_only = int(((champion == 0) & (challenger == 1)).sum())
    discordant = champion_only + challenger_only
    p = stats.binomtest(challenger_only, discordant, 0.5).pvalue if discordant else 1.0
    n = len(pairs)
    return AccuracyTest(
        n,
        float(champion.mean()),
        float(challenger.mean()),
        proportion_interval(int(champion.sum()), n, confidence),
        proportion_interval(int(challenger.sum()), n, confidence),
        paired_difference_interval(champion, challenger, confidence),
        champion_only,
        challenger_only,
        float(p),
    )


def paired_difference_interval(before: np.ndarray, after: np.ndarray, confidence: float) -> Interval:
    """Newcombe's hybrid score interval (1998, method 10) for the difference of two paired proportions,
    ``mean(after) - mean(before)``, from 0/1 outcomes on the same prompts.

    The bootstrap is no good here: with a handful of discordant prompts it excludes 0 while McNemar's
    exact test finds nothing. Newcombe's interval builds on the two Wilson intervals and the
    correlation of the pairs, and agrees with McNemar. No maintained library here computes it.
    """
    n = len(before)
    if n == 0:
        return _unknown(confidence)
    both = int(((before == 1) & (after == 1)).sum())
    only_before = int(((before == 1) & (after == 0)).sum())
    only_after = int(((before == 0) & (after == 1)).sum())
    neither = n - both - only_before - only_after
    p_before, p_after = (both + only_before) / n, (both + only_after) / n
    low_b, high_b = _wilson(both + only_before, n, confidence)
    low_a, high_a = _wilson(both + only_after, n, confidence)
    phi = _pair_correlation(both, only_before, only_after, neither, n)
    difference = p_after - p_before
    low = difference - math.sqrt(
        max((p_after - low_a) ** 2 - 2 * phi * (p_after - low_a) * (high_b - p_before) + (high_b - p_before) ** 2, 0)
    )
    high = difference + math.sqrt(
        max((high_a - p_after) ** 2 - 2 * phi * (high_a - p_after) * (p_before - low_b) + (p_before - low_b) ** 2, 0)
    )
    return Interval(round(max(low, -1.0), 4), round(min(high, 1.0), 4), confidence)


def _wilson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    from scipy import stats

    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _pair_correlation(both: int, only_before: int, only_after: int, neither: int, n: int) -> float:
    """The phi coefficient of the paired table, with Newcombe's continuity correction."""
    denominator = math.sqrt(
        (both + only_before) * (only_after + neither) * (both + only_after) * (only_before + neither)
    )
    if denominator == 0:
        return 0.0
    numerator = both * neither - only_before * only_after
    if numerator > 0:
        numerator = max(numerator - n / 2, 0.0)
    return numerator / denominator


def format_p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def p_phrase(p: float) -> str:
    """'p = 0.07' or 'p < 0.001', for sentences."""
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"

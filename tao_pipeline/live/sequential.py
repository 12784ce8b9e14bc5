"""A decision on live traffic that stays valid however often it is checked.

Live evidence arrives one answer at a time and the decision is looked at every minute, so a test
that assumes one look at a fixed sample size (a t-test, a bootstrap interval) would be peeked into
false alarms. This module keeps a *confidence sequence* instead: an interval for the challenger's
mean advantage that covers the true value at every sample size at once with probability
``confidence``. It is the predictable plug-in empirical-Bernstein confidence sequence of
Waudby-Smith and Ramdas ("Estimating means of bounded random variables by betting", JRSS B 2023,
Theorem 2) for observations in [0, 1]: closed form, one pass, and it narrows with the observed
variance, so mostly tied answers decide far sooner than a worst-case (Hoeffding) bound would. A
paired difference of two scores in [0, 1] lies in [-1, 1] and is mapped onto [0, 1] for it.

The decision is a non-inferiority test on that interval, with ``margin`` >= 0:

* **promote** once the lower bound is above ``-margin`` (proven no worse than the champion by more
  than the margin);
* **roll back** once the upper bound is below ``-margin`` (proven worse by more than the margin);
* otherwise **continue**. Each wrong call has probability at most ``(1 - confidence) / 2``, at any
  stopping time (each side's bound holds at level ``alpha / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tao_pipeline.common.confidence_sequence import advantage_bounds

PROMOTE, ROLL_BACK, CONTINUE = "promote", "roll back", "continue"


@dataclass(frozen=True)
class LiveVerdict:
    decision: str  # PROMOTE, ROLL_BACK or CONTINUE
    n: int  # paired observations seen
    mean: float  # the challenger's mean advantage (challenger minus champion)
    low: float
    high: float
    reason: str

    def as_dict(self) -> dict:
        return {
            "decision": self.decision,
            "n": self.n,
            "mean": round(self.mean, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "reason": self.reason,
        }


def decide(
    differences,
    *,
    margin: float,
    confidence: float,
    min_pairs: int,
    max_pairs: int | None = None,
    hours: float = 0.0,
    max_hours: float | None = None,
) -> LiveVerdict:
    """The decision after these paired differences (challenger minus champion, each in [-1, 1]).

    An experiment still undecided after ``max_pairs`` pairs, or ``max_hours`` after it started
    (``hours`` ago; whatever the traffic, min_pairs or not), ends as a rollback: the challenger was not
    proven no worse (a true difference near ``-margin`` can take the test very long either way, and a
    quiet app may never send enough). Ending there never promotes without proof, so the promotion's
    error rate stays bounded.
    """
    values = _checked(differences)
    if values.size == 0:
        verdict = LiveVerdict(CONTINUE, 0, 0.0, -1.0, 1.0, "no paired observations yet")
    else:
        lows, highs = advantage_bounds(values, 1 - confidence)
        verdict = _verdict(values, float(lows[-1]), float(highs[-1]), margin, confidence, min_pairs)
    if verdict.decision != CONTINUE:
        return verdict
    if max_pairs is not None and verdict.n >= max(max_pairs, min_pairs):
        bound = f"no decision after live.max_pairs={max_pairs} pairs"
    elif max_hours is not None and hours >= max_hours:
        bound = f"no decision {hours:.1f} h after it started (live.max_hours={max_hours:g})"
    else:
        return verdict
    reason = f"{verdict.reason.rsplit(':', 1)[0]}: {bound}, not proven no worse than -{margin}"
    return replace(verdict, decision=ROLL_BACK, reason=reason)


def first_decision(differences, *, margin: float, confidence: float, min_pairs: int) -> LiveVerdict:
    """The verdict where a check after every observation would first have decided (or after the last one)."""
    values = _checked(differences)
    if values.size == 0:
        return decide(values, margin=margin, confidence=confidence, min_pairs=min_pairs)
    lows, highs = advantage_bounds(values, 1 - confidence)
    n = np.arange(1, values.size + 1)
    decided = (n >= min_pairs) & ((highs < -margin) | (lows > -margin))
    stop = int(np.argmax(decided)) if decided.any() else values.size - 1
    return _verdict(values[: stop + 1], float(lows[stop]), float(highs[stop]), margin, confidence, min_pairs)


def _checked(differences) -> np.ndarray:
    values = np.asarray(differences, dtype=float).ravel()
    if values.size and (not np.isfinite(values).all() or np.abs(values).max() > 1 + 1e-9):
        raise ValueError("live differences must be finite and within [-1, 1] (two scores in [0, 1])")
    return np.clip(values, -1.0, 1.0)


def _verdict(values: np.ndarray, low: float, high: float, margin: float, confidence: float, min_pairs: int):
    n, mean = int(values.size), float(values.mean())
    interval = f"advantage {mean:+.3f} [{low:+.3f}, {high:+.3f}] at {confidence:.0%}, always valid, n = {n}"
    if n < min_pairs:
        return LiveVerdict(CONTINUE, n, mean, low, high, f"{interval}: waiting for live.min_pairs={min_pairs}")
    if high < -margin:
        return LiveVerdict(ROLL_BACK, n, mean, low, high, f"{interval}: proven worse by more than {margin}")
    if low > -margin:
        return LiveVerdict(PROMOTE, n, mean, low, high, f"{interval}: proven no worse than -{margin}")
    return LiveVerdict(CONTINUE, n, mean, low, high, f"{interval}: not decided yet")

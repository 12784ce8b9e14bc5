"""An interval for the mean of bounded observations that holds at every sample size at once.

The predictable plug-in empirical-Bernstein confidence sequence of Waudby-Smith and Ramdas
("Estimating means of bounded random variables by betting", JRSS B 2023, Theorem 2) for observations
in [0, 1]: closed form, one pass, and it narrows with the observed variance. Checking it after every
observation is valid (no peeking problem): the live decision (:mod:`tao_pipeline.live.sequential`) and
`tao serve`'s error guard use it.
"""

from __future__ import annotations

import numpy as np

MAX_BET = 0.5  # the paper's truncation c of the bets lambda_t


def confidence_sequence(unit: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on the mean of observations in [0, 1] after each one (running intersection)."""
    x = np.asarray(unit, dtype=float)
    t = np.arange(1, x.size + 1)
    mean_hat = (0.5 + np.cumsum(x)) / (t + 1)
    variance_hat = (0.25 + np.cumsum((x - mean_hat) ** 2)) / (t + 1)
    variance_before = np.concatenate([[0.25], variance_hat[:-1]])
    mean_before = np.concatenate([[0.5], mean_hat[:-1]])
    log_term = np.log(2 / alpha)
    bets = np.minimum(np.sqrt(2 * log_term / (variance_before * t * np.log1p(t))), MAX_BET)
    penalty = 4 * (x - mean_before) ** 2 * (-np.log1p(-bets) - bets) / 4
    total_bet = np.cumsum(bets)
    center = np.cumsum(bets * x) / total_bet
    half = (log_term + np.cumsum(penalty)) / total_bet
    low = np.maximum.accumulate(np.clip(center - half, 0.0, 1.0))
    high = np.minimum.accumulate(np.clip(center + half, 0.0, 1.0))
    return low, high


def advantage_bounds(differences: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the mean of differences in [-1, 1] after each one."""
    low, high = confidence_sequence((np.asarray(differences, dtype=float) + 1) / 2, alpha)
    return 2 * low - 1, 2 * high - 1


class RunningBounds:
    """:func:`advantage_bounds` kept one observation at a time, in constant time and memory: for a check
    after every request (the server's error guard), where recomputing the whole sequence would grow with
    the traffic."""

    def __init__(self, alpha: float):
        self.log_term = float(np.log(2 / alpha))
        self.n = 0
        self.low, self.high = -1.0, 1.0
        self._sum = self._squares = self._bet_sum = self._weighted = self._penalty = 0.0
        self._mean, self._variance = 0.5, 0.25  # the plug-in estimates before the next observation

    def add(self, difference: float) -> None:
        x = (float(np.clip(difference, -1.0, 1.0)) + 1) / 2
        self.n += 1
        t = self.n
        bet = min(float(np.sqrt(2 * self.log_term / (self._variance * t * np.log1p(t)))), MAX_BET)
        self._penalty += (x - self._mean) ** 2 * (-np.log1p(-bet) - bet)
        self._bet_sum += bet
        self._weighted += bet * x
        center, half = self._weighted / self._bet_sum, (self.log_term + self._penalty) / self._bet_sum
        self.low = max(self.low, 2 * float(np.clip(center - half, 0.0, 1.0)) - 1)
        self.high = min(self.high, 2 * float(np.clip(center + half, 0.0, 1.0)) - 1)
        self._sum += x
        self._mean = (0.5 + self._sum) / (t + 1)
        self._squares += (x - self._mean) ** 2
        self._variance = (0.25 + self._squares) / (t + 1)

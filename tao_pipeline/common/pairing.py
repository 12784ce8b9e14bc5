"""Pairing the two arms of a live experiment in time.

A canary's answers and the champion's arrive interleaved, at the canary's share. Each answer is paired
with the other arm's next one, so a pair is two answers given close together: a slow drift or an outage
that touches both arms cancels out of the difference. An answer still waiting when another of its own arm
arrives is dropped (its neighbour in time is the newer one). The server's error guard pairs requests as
they end (:mod:`tao_pipeline.serving.live`); the live decision pairs logged answers (:mod:`tao_pipeline.live.evidence`).
"""

from __future__ import annotations

from collections.abc import Iterable


class PairsInTime:
    """Fed one arm's value at a time, in order; returns challenger minus champion when a pair completes."""

    def __init__(self) -> None:
        self._waiting: dict[bool, float] = {}  # is the challenger's -> value, of the newest unpaired one

    def add(self, is_challenger: bool, value: float) -> float | None:
        if (not is_challenger) not in self._waiting:
            self._waiting[is_challenger] = value
            return None
        other = self._waiting.pop(not is_challenger)
        return value - other if is_challenger else other - value


def paired_in_time(is_challenger: Iterable[bool], values: Iterable[float]) -> list[float]:
    """Challenger minus champion for every pair, in order."""
    pairs = PairsInTime()
    differences = (pairs.add(bool(c), float(v)) for c, v in zip(is_challenger, values, strict=True))
    return [d for d in differences if d is not None]

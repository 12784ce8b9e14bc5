"""Wall time and peak resident memory of a block of work, for stage metadata and benchmarks."""

from __future__ import annotations

import threading
import time

import psutil

SAMPLE_INTERVAL_S = 0.1


class PeakMemory:
    """Samples this process's RSS in a background thread while the block runs."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.seconds = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._started = time.perf_counter()
        self.peak_bytes = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self.seconds = time.perf_counter() - self._started

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def _record(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def metadata(self) -> dict[str, float]:
        return {"peak_rss_mb": round(self.peak_mb, 1), "stage_seconds": round(self.seconds, 1)}

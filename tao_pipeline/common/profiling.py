"""What a block of work cost, for stage metadata, the round's cost and benchmarks.

:class:`PeakMemory` measures wall time and peak resident memory. :class:`StageMeter` adds CPU
seconds (this process and its subprocesses, e.g. training workers), GPU seconds (sampled) and the
tokens generated and judge calls made inside the block, which the code doing that work reports
with :func:`record_usage` wherever it runs (a meter is found through a context variable, so no
signature has to carry it).
"""

from __future__ import annotations

import contextvars
import glob
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass

import psutil

SAMPLE_INTERVAL_S = 0.1
GPU_SAMPLE_INTERVAL_S = 1.0
_GPU_DEVICE_FILE = re.compile(r"^/dev/nvidia(\d+)$")  # one per GPU; nvidiactl and nvidia-uvm are not GPUs


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


@dataclass(slots=True)
class Usage:
    """Work counted where it happens: tokens a model generated, and calls to an LLM judge (cache hits excluded)."""

    generated_tokens: int = 0
    judge_calls: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_OPEN_METERS: contextvars.ContextVar[tuple[StageMeter, ...]] = contextvars.ContextVar("open_meters", default=())
_USAGE_LOCK = threading.Lock()


def record_usage(**counts: int) -> None:
    """Add ``counts`` (fields of :class:`Usage`) to every StageMeter open in this context; a no-op outside one.

    A thread pool's task sees the meter when submitted with ``contextvars.copy_context().run``."""
    meters = _OPEN_METERS.get()
    with _USAGE_LOCK:
        for meter in meters:
            for name, count in counts.items():
                setattr(meter.usage, name, getattr(meter.usage, name) + int(count))


class StageMeter(PeakMemory):
    """PeakMemory, plus CPU seconds, GPU seconds and the :class:`Usage` recorded while the block runs.

    - CPU seconds: user + system time of this process, of the subprocesses it waited for (their
      children included, e.g. `accelerate launch` and its workers), and of its live subprocesses
      (e.g. a vLLM engine core) since the block started. The whole process is measured: two meters
      running at once in one process each count the other's work.
    - GPU seconds: sampled every ``gpu_interval_s``; each interval counts the GPUs on which this
      process holds PyTorch tensors plus the GPUs whose device files (/dev/nvidiaN) its
      subprocesses hold open. 0 on a machine without NVIDIA GPUs (nothing is sampled there).
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, gpu_interval_s: float = GPU_SAMPLE_INTERVAL_S):
        super().__init__(interval_s)
        self.gpu_interval_s = gpu_interval_s
        self.usage = Usage()
        self.cpu_seconds = 0.0
        self.gpu_seconds = 0.0
        self._gpus_present = bool(glob.glob("/dev/nvidia[0-9]*"))

    def __enter__(self) -> StageMeter:
        self._cpu_at_start = _own_cpu_seconds(self._process)
        self._subprocess_cpu_at_start = _subprocess_cpu_seconds(self._process)
        self._gpu_sampled_at = time.perf_counter()
        self._opened = _OPEN_METERS.set((*_OPEN_METERS.get(), self))
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._sample_gpus(force=True)
        _OPEN_METERS.reset(self._opened)
        still_running = _subprocess_cpu_seconds(self._process)
        subprocesses = sum(
            seconds - self._subprocess_cpu_at_start.get(key, 0.0) for key, seconds in still_running.items()
        )
        self.cpu_seconds = _own_cpu_seconds(self._process) - self._cpu_at_start + max(subprocesses, 0.0)

    def _record(self) -> None:
        super()._record()
        self._sample_gpus()

    def _sample_gpus(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self._gpus_present or (not force and now - self._gpu_sampled_at < self.gpu_interval_s):
            return
        self.gpu_seconds += (now - self._gpu_sampled_at) * gpus_in_use(self._process)
        self._gpu_sampled_at = now


def gpus_in_use(process: psutil.Process) -> int:
    """GPUs where ``process`` holds PyTorch tensors, plus the GPUs its subprocesses hold open."""
    held: set[str] = set()
    for child in _descendants(process):
        held |= _gpu_device_files(child.pid)
    return _torch_gpus_in_use() + len(held)


def _torch_gpus_in_use() -> int:
    torch = sys.modules.get("torch")  # never imported here: a process that has not imported it uses no GPU
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return sum(torch.cuda.memory_allocated(index) > 0 for index in range(torch.cuda.device_count()))


def _gpu_device_files(pid: int) -> set[str]:
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:  # gone, or not ours to read
        return set()
    held = set()
    for name in names:
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if _GPU_DEVICE_FILE.match(target):
            held.add(target)
    return held


def _own_cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _subprocess_cpu_seconds(process: psutil.Process) -> dict[tuple[int, float], float]:
    """User + system seconds of each live subprocess so far, keyed by (pid, start time) so a reused pid is new."""
    seconds = {}
    for child in _descendants(process):
        try:
            with child.oneshot():
                times = child.cpu_times()
                seconds[(child.pid, child.create_time())] = times.user + times.system
        except psutil.Error:
            continue
    return seconds


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []

"""How many CPUs this process may really use, and torch's thread count chosen from them.

``os.cpu_count()`` counts the machine's cores, not the ones this process gets: a CPU affinity mask
(``taskset``, a container's cpuset) or a cgroup CPU quota (Kubernetes' ``resources.limits.cpu``)
can give it fewer. A thread pool larger than that waits at every barrier for a thread whose core
was taken away.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
logger = logging.getLogger(__name__)


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 ``cpu.max`` or v1 CFS), None if unlimited."""
    v2 = _read(cgroup_root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period)
    return _ratio(_read(cgroup_root / "cpu" / "cpu.cfs_quota_us"), _read(cgroup_root / "cpu" / "cpu.cfs_period_us"))


def _ratio(quota: str | None, period: str | None) -> float | None:
    try:
        quota_us, period_us = int(quota or ""), int(period or "")
    except ValueError:  # "max", missing or unreadable: no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


# torch's thread pool (OpenMP) on a machine shared with other work.
#
# torch's pool waits at every barrier for all of its threads, and a decode step has hundreds: when another process
# holds one of the cores, every parallel region waits for the thread queued behind it, while the waiting threads
# spin. bench/threads.py on a quiet 2-core machine (README, "Speed on a busy machine"): with one busy process at
# nice 0 beside it, torch's two threads sampled 137 tokens/s (372 alone) and took 4.8 s per DPO step (1.7 alone);
# one thread, 309 tokens/s and 2.4 s. With two busy processes, two threads were 5.6-6.2x slower than alone. A busy
# process at nice 19 took nothing from two threads (the scheduler gives the core back at once). On a machine
# shared with other sessions' work, threads that sleep at once at a barrier (OMP_WAIT_POLICY=PASSIVE) recovered
# most of the loss, spinning ones (ACTIVE) made it worse, and the inter-op pool changed nothing: the barrier it is.
# So an unset setting gives the pool the usable CPUs other processes at our priority leave free, measured while
# this process waits, and sizes it again as the load changes (at most every REMEASURE_S).
MEASURE_WINDOW_S = 0.1
REMEASURE_S = 10.0
# Another process using more than this share of a CPU takes it away from the pool: when it runs, a thread queues.
TAKEN_SHARE = 0.25


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads torch's pool gets, and why."""

    threads: int
    reason: str

    def metadata(self) -> dict[str, int | str]:
        return {"torch_threads": self.threads, "torch_threads_why": self.reason}


_lock = threading.Lock()
_unset_choices: dict[str, tuple[float, ThreadChoice]] = {}  # setting name -> (time.monotonic(), the choice then)
_torch_default: int | None = None  # torch's own count before the first choice (physical cores, or OMP_NUM_THREADS)


def use_torch_threads(setting: int | None, name: str) -> ThreadChoice:
    """Size torch's intra-op pool from ``setting`` (e.g. ``generation.threads``; None: the CPUs free now).

    Generation, training, preflight and serving call this before their torch work, and again between batches or
    steps: an unset setting follows the machine's load. Call it in the thread that runs the model: torch's count
    is OpenMP's, which each thread keeps for itself once it has run a parallel operation. Returns the choice, for
    metadata and logs.
    """
    import torch

    global _torch_default
    with _lock:
        if _torch_default is None:
            _torch_default = torch.get_num_threads()
        choice = _choice(setting, name, _torch_default)
        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
            logger.info("torch threads: %d (%s)", choice.threads, choice.reason)
    return choice


def choose_threads(
    setting: int | None,
    name: str,
    *,
    torch_default: int,
    busy_elsewhere: Callable[[], float],
    cgroup_root: Path = CGROUP_ROOT,
) -> ThreadChoice:
    """The thread count for ``setting``: as given, or the usable CPUs (at most torch's default) others leave free."""
    if setting is not None:
        return ThreadChoice(setting, f"{name}={setting}")
    usable = min(usable_cpus(cgroup_root), torch_default)
    busy = busy_elsewhere()
    free = max(1, min(usable, math.floor(_cpus_in_mask() - busy + TAKEN_SHARE)))
    return ThreadChoice(
        free,
        f"{name} unset: {usable} usable CPUs (affinity, cgroup quota, torch's default {torch_default}), "
        f"other processes busy on {busy:.2f} of them",
    )


def _choice(setting: int | None, name: str, torch_default: int) -> ThreadChoice:
    """The choice for ``setting``; an unset one made again at most every REMEASURE_S (under the caller's lock)."""
    if setting is not None:
        return choose_threads(setting, name, torch_default=torch_default, busy_elsewhere=busy_elsewhere)
    now = time.monotonic()
    made = _unset_choices.get(name)
    if made is None or now - made[0] >= REMEASURE_S:
        made = (now, choose_threads(None, name, torch_default=torch_default, busy_elsewhere=busy_elsewhere))
        _unset_choices[name] = made
    return made[1]


@dataclass(frozen=True)
class CpuSample:
    """Busy seconds so far on this process's CPUs, this process's own CPU seconds, and when."""

    busy: float
    own: float
    at: float


def busy_elsewhere(window_s: float = MEASURE_WINDOW_S) -> float:
    """CPUs' worth of time other processes (and the hypervisor: steal) took on this process's CPUs over ``window_s``;
    this process's own CPU time in the window is left out. 0.0 where the counters cannot be read."""
    before = sample_cpus(_affinity())
    if before is None:
        return 0.0
    time.sleep(window_s)
    after = sample_cpus(_affinity())
    return 0.0 if after is None else busy_between(before, after)


def busy_between(before: CpuSample, after: CpuSample) -> float:
    elapsed = after.at - before.at
    if elapsed <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / elapsed)


def sample_cpus(cpus: set[int]) -> CpuSample | None:
    import psutil

    try:
        per_cpu = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError):
        return None
    niced_take_cpus = _own_niceness() > 0
    busy = sum(_busy_seconds(times, niced_take_cpus) for index, times in enumerate(per_cpu) if index in cpus)
    return CpuSample(busy, time.process_time(), time.monotonic())


def _busy_seconds(times, niced_take_cpus: bool) -> float:
    """Everything but idle and waiting for I/O (guest time is already inside user time on Linux). Time of niced
    processes (nice > 0) counts only when this process is niced too: the scheduler gives a process at nice 0 its
    core back at once (a nice-19 process weighs 15 against its 1024), so they take nothing from its pool.
    bench/threads.py measured it: one busy process at nice 19 left two threads at full speed, one at nice 0 did not.
    """
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    niced = 0.0 if niced_take_cpus else getattr(times, "nice", 0.0)
    return sum(times) - idle - guest - niced


def _own_niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cpus_in_mask() -> int:
    return len(_affinity())

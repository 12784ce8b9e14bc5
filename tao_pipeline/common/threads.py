"""How many CPUs this process may really use, and torch's thread count chosen from them.

``os.cpu_count()`` counts the machine's cores, not the ones this process gets: a CPU affinity mask
(``taskset``, a container's cpuset) or a cgroup CPU quota (Kubernetes' ``resources.limits.cpu``)
can give it fewer. A thread pool larger than that waits at every barrier for a thread whose core
was taken away.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


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

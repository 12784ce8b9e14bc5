"""A pytest plugin: a test not marked ``slow`` (or ``ui``, ``gpu``) fails when it takes over its budget (20 s).

The budget is for the test's own time, so that a loaded CI machine does not fail a test that is
fine: the wall time of its setup and call, less the time other work took from it: the larger of the
time its thread was ready to run but waited for a CPU (Linux's /proc/thread-self/schedstat) and the
CPU time the rest of the machine used meanwhile, spread over the usable CPUs (/proc/stat less this
process's rusage; it covers a subprocess the test waits on, whose waits the thread cannot see), at
most the CPU time the test itself used (a test that sleeps loses nothing to other work).
Time spent sleeping, or waiting on a server or a subprocess, still counts: the developer waits too.
A module- or session-scoped fixture is shared work, built for whichever test needs it first: its
time is not that test's, and each such fixture has the same budget of its own.
``-o fast_test_budget_s=0`` turns the check off.

The run's summary also says where the CPU went: the CPU seconds of each test's setup and call (its process and
the subprocesses it waited on), added up, and the tests that used the most. On 2 cores the suite cannot take
less wall time than half of that total, however its tests are spread over workers.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
from hypothesis import is_hypothesis_test

from tao_pipeline.common.threads import usable_cpus

BUDGET_INI = "fast_test_budget_s"
EXEMPT_MARKERS = ("slow", "ui", "gpu")  # allowed to take minutes; slow and ui are part of CI
_SCHEDSTAT = Path("/proc/thread-self/schedstat")
# Set by tests/conftest.py under TAO_FUZZ=full or TAO_FUZZ_SCALE: property tests then run long on purpose.
FUZZ_SCALED_UP = pytest.StashKey[bool]()
_SPENT = pytest.StashKey["Spent"]()
CPU_SECONDS = "cpu_seconds"  # a call report's user property: its test's CPU seconds (setup and call)
CPU_SUMMARY_TOP = 12


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        BUDGET_INI,
        "seconds of its own time a test not marked slow may take (setup and call), 0 for no limit",
        default="20",
    )


def cpu_wait_s() -> float:
    """Seconds this thread has spent ready to run but waiting for a CPU (0.0 where Linux does not say)."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process and its finished children, CPU seconds of the whole machine's work): the
    rusage of both, and /proc/stat's busy time (user to steal; no idle, no iowait)."""
    ours = sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return ours, ours
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return ours, (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OwnClock:
    """Started now; ``read()`` gives (own seconds, seconds lost to other work) since then.

    What other work takes is the larger of two measures: how long this thread waited for a CPU, and the
    CPU time the rest of the machine used, spread over the CPUs this run may use (that one also covers a
    subprocess the test waits on, which this thread's own wait cannot see), but never more than the CPU
    time the test itself needed: a test that sleeps loses nothing to other work.
    """

    def __init__(self) -> None:
        self.wall, self.wait, (self.ours, self.machine) = time.perf_counter(), cpu_wait_s(), cpu_seconds()
        self.used = 0.0  # CPU seconds of this process and its finished children, as of the last read()

    def read(self) -> tuple[float, float]:
        ours, machine = cpu_seconds()
        used = self.used = max(0.0, ours - self.ours)
        elsewhere = max(0.0, (machine - self.machine) - used) / usable_cpus()
        lost = max(cpu_wait_s() - self.wait, min(elsewhere, used))
        return max(0.0, time.perf_counter() - self.wall - lost), lost


class Spent:
    """One test's time: its own and its waits, and the shared fixtures it happened to build first."""

    def __init__(self) -> None:
        self.own = self.waited = self.cpu = 0.0
        self.shared: dict[str, float] = {}  # fixture name -> own seconds of its setup
        self._building_shared = 0  # shared fixtures being set up right now (one may need another)

    def add(self, clock: OwnClock) -> None:
        own, waited = clock.read()
        self.own, self.waited, self.cpu = self.own + own, self.waited + waited, self.cpu + clock.used

    @property
    def test_own(self) -> float:
        return max(0.0, self.own - sum(self.shared.values()))


_current: Spent | None = None  # the test being set up or run in this process


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    global _current
    _current = item.stash[_SPENT] = Spent()
    clock = OwnClock()
    try:
        return (yield)
    finally:
        _current.add(clock)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    clock = OwnClock()
    try:
        return (yield)
    finally:
        item.stash[_SPENT].add(clock)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef):
    spent = _current
    if spent is None or fixturedef.scope == "function":
        return (yield)
    outermost, clock = spent._building_shared == 0, OwnClock()
    spent._building_shared += 1
    try:
        return (yield)
    finally:
        spent._building_shared -= 1
        if outermost:  # a shared fixture another one needed is inside the outer one's time already
            spent.shared[fixturedef.argname] = spent.shared.get(fixturedef.argname, 0.0) + clock.read()[0]


def _exempt(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(name) for name in EXEMPT_MARKERS):
        return True
    return item.config.stash.get(FUZZ_SCALED_UP, False) and is_hypothesis_test(getattr(item, "obj", None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item):
    report: pytest.TestReport = yield
    spent = item.stash.get(_SPENT, None)
    if report.when == "call" and spent is not None:
        report.user_properties.append((CPU_SECONDS, round(spent.cpu, 2)))
    if report.when != "call" or not report.passed or spent is None:
        return report
    budget = float(item.config.getini(BUDGET_INI))
    if budget <= 0 or _exempt(item):
        return report
    over = [f"took {spent.test_own:.1f} s of its own time (setup and call)"] if spent.test_own > budget else []
    over += [f"built the shared fixture {name!r} in {own:.1f} s" for name, own in spent.shared.items() if own > budget]
    if over:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} {' and '.join(over)}, over the {budget:g} s budget of a test not marked slow "
            f"({spent.waited:.1f} s lost to other work on the machine not counted). Make it cheaper (fewer steps or "
            f"examples, the tiny model, a module- or session-scoped fixture for work other tests repeat) or, if it "
            f"needs a real model or minutes, mark it @pytest.mark.slow. `pytest --durations=20` shows where the "
            f"time goes."
        )
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    """The CPU seconds of all tests' setup and call, added up over every xdist worker, and the largest."""
    spent = {
        report.nodeid: seconds
        for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
        if getattr(report, "when", None) == "call"
        for name, seconds in report.user_properties
        if name == CPU_SECONDS
    }
    total = sum(spent.values())
    if not spent or total <= 0:
        return
    largest = sorted(spent.items(), key=lambda item: -item[1])[:CPU_SUMMARY_TOP]
    terminalreporter.write_line(
        f"cpu: {total:,.0f} CPU-s in the tests' setup and call (their processes and the subprocesses they waited "
        f"on), at least {total / usable_cpus():,.0f} s of wall time on {usable_cpus()} CPUs; the most:"
    )
    for nodeid, seconds in largest:
        terminalreporter.write_line(f"  {seconds:8.1f} CPU-s {seconds / total:6.1%}  {nodeid}")

"""The time budget of a test not marked slow (tests/time_budget.py): over it, the test fails and says what
to do; a slow test may take longer; time spent waiting for a CPU that other work holds is not counted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.time_budget import OwnClock

pytest_plugins = ["pytester"]

TESTS = """
import time
import pytest

def test_quick():
    pass

def test_sleepy():
    time.sleep(0.6)  # waiting counts: the developer waits too

@pytest.mark.slow
def test_sleepy_but_marked_slow():
    time.sleep(0.6)

@pytest.fixture
def slow_setup():
    time.sleep(0.6)

def test_with_a_slow_fixture(slow_setup):
    pass

@pytest.fixture(scope="module")
def shared_work():
    time.sleep(0.25)  # built for the first test that needs it: not that test's time

def test_using_shared_work(shared_work):
    time.sleep(0.1)

def test_also_using_shared_work(shared_work):
    time.sleep(0.1)

@pytest.fixture(scope="session")
def too_much_shared_work():
    time.sleep(0.6)

def test_using_too_much_shared_work(too_much_shared_work):
    pass
"""


def run_with_budget(pytester: pytest.Pytester, budget: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\nmarkers =\n    slow: real model\n    ui: browser\n    gpu: cuda\n")
    pytester.makepyfile(test_sleepy=TESTS)
    return pytester.runpytest_inprocess(
        "-p", "tests.time_budget", "-p", "no:randomly", "-o", f"fast_test_budget_s={budget}"
    )


def test_a_test_over_its_budget_fails_and_says_what_to_do(pytester):
    result = run_with_budget(pytester, "0.3")
    calls = [report for report in result.reprec.getreports("pytest_runtest_logreport") if report.when == "call"]
    assert {report.nodeid.split("::")[-1]: report.outcome for report in calls} == {
        "test_quick": "passed",
        "test_sleepy": "failed",
        "test_sleepy_but_marked_slow": "passed",
        "test_with_a_slow_fixture": "failed",  # its own fixture is part of what running it costs
        "test_using_shared_work": "passed",  # the shared fixture's 0.25 s are not its own
        "test_also_using_shared_work": "passed",
        "test_using_too_much_shared_work": "failed",  # a shared fixture has the budget too
    }
    text = result.stdout.str()
    assert "test_sleepy.py::test_sleepy took 0.6 s of its own time (setup and call), over the 0.3 s budget" in text
    assert "built the shared fixture 'too_much_shared_work' in 0.6 s, over the 0.3 s budget" in text
    assert "mark it @pytest.mark.slow" in text and "session-scoped fixture" in text


def test_a_budget_of_zero_turns_the_check_off(pytester):
    run_with_budget(pytester, "0").assert_outcomes(passed=7)


BUSY_TESTS = """
import subprocess, sys, time

BURN = "import time\\nend = time.process_time() + {}\\nwhile time.process_time() < end: pass"

def test_busy_here():
    exec(BURN.format(0.3))

def test_busy_in_a_subprocess():
    subprocess.run([sys.executable, "-c", BURN.format(0.6)], check=True)

def test_idle():
    time.sleep(0.2)
"""


def test_the_summary_says_where_the_cpu_went_subprocesses_included(pytester):
    pytester.makepyfile(test_busy=BUSY_TESTS)
    result = pytester.runpytest_inprocess("-p", "tests.time_budget", "-p", "no:randomly", "-o", "fast_test_budget_s=0")
    result.assert_outcomes(passed=3)
    lines = result.stdout.lines
    [header] = [line for line in lines if line.startswith("cpu: ")]
    total = float(header.split()[1].replace(",", ""))
    assert total >= 0.8 and "CPU-s in the tests' setup and call" in header, header
    listed = [
        line for line in lines if line.strip().endswith(("test_busy_here", "test_busy_in_a_subprocess", "test_idle"))
    ]
    assert [line.split("::")[-1] for line in listed] == ["test_busy_in_a_subprocess", "test_busy_here", "test_idle"]
    assert float(listed[0].split()[0]) >= 0.5 and float(listed[1].split()[0]) >= 0.25  # the child's CPU counts


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="needs Linux's schedstat")
def test_time_waiting_for_a_busy_cpu_is_not_the_tests_own():
    """Two busy processes share this thread's one CPU: the wall time triples, the own time does not."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for hog in hogs:
            os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        clock, wall, work = OwnClock(), time.perf_counter(), time.thread_time()
        while time.thread_time() - work < 0.5:  # half a second of this thread's CPU time
            pass
        own, waited = clock.read()
        wall = time.perf_counter() - wall
    finally:
        os.sched_setaffinity(0, before)
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert wall > 1.0, f"the CPU was not shared: {wall:.2f} s of wall time for 0.5 s of work"
    assert waited > 0.5 and own < 0.8, f"own {own:.2f} s, waited {waited:.2f} s, wall {wall:.2f} s"

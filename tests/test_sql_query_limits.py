"""Each SQL query's limits are its own, and a query stopped by the verifier's limits scores 0 only when it
is shown to be the cause; otherwise its score is unknown (Failed), never 0.

Real worker processes, real signals: a worker stopped with SIGSTOP stands for a machine too busy
to run it, one killed with SIGKILL for the machine's OOM killer.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import duckdb
import psutil
import pytest

from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.sql import SqlExecutionVerifier
from tao_pipeline.scoring.sql_sandbox import SandboxProcess

CONTEXT = PromptContext(prompt="How many rows?", task="sql")
# About 0.2 s of CPU here: cheap, but enough that 16 of them use more CPU than the worker's whole
# lifetime was once allowed (int(timeout_s + 1) + 2 = 3 s at timeout_s=0.5).
MODERATE = "SELECT sum(length(md5(i::VARCHAR))) FROM range(1000000) t(i)"
MODERATE_RESULT = [32 * 1000000]
SPINS_FOREVER = "SELECT count(*) FROM range(1000000) a CROSS JOIN range(1000000) b WHERE a.range + b.range = -1"
HUGE_LIST = "SELECT len(list(range(400000000)))"  # memory outside DuckDB's buffer manager


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "rows.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE t AS SELECT * FROM range(10) r(i)")
    return path


@pytest.fixture
def verifier(database):
    made: list[SqlExecutionVerifier] = []

    def make(**options) -> SqlExecutionVerifier:
        made.append(SqlExecutionVerifier(database=str(database), **options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def worker(verifier: SqlExecutionVerifier) -> psutil.Process:
    return psutil.Process(verifier._sandbox._process.pid)


def starts_counted(monkeypatch) -> list[int]:
    """The pid of every worker the sandboxes start from now on."""
    pids: list[int] = []
    start = SandboxProcess._worker

    def counting(self):
        was = self._process
        process = start(self)
        if process is not was:
            pids.append(process.pid)
        return process

    monkeypatch.setattr(SandboxProcess, "_worker", counting)
    return pids


# -- each query has its own CPU budget -------------------------------------------------------------


def test_the_same_correct_query_many_times_is_never_killed(verifier, monkeypatch):
    """The issue's case: the CPU rlimit counted over the worker's life killed the 1x-th run of a correct query."""
    check = verifier(timeout_s=0.5)
    pids = starts_counted(monkeypatch)
    scores = check.score_group(CONTEXT, [f"```sql\n{MODERATE}\n```"] * 16)
    assert check.last_reasons() == [None] * 16
    assert scores == [1.0] * 16
    assert len(pids) == 1  # one worker ran them all: none was killed
    process = worker(check)
    used = sum(process.cpu_times()[:2])
    assert used > 3.0, used  # more than the worker's whole life was once allowed
    soft, _ = process.rlimit(psutil.RLIMIT_CPU)
    assert soft >= used + 0.5  # and the next query still has its whole budget before the kernel steps in


def test_a_query_that_uses_its_whole_cpu_budget_scores_0_without_a_second_run(verifier, monkeypatch):
    check = verifier(timeout_s=0.5)
    check.score_group(CONTEXT, ["SELECT 1"])  # the worker has run something: its CPU use counts for nothing
    pids = starts_counted(monkeypatch)
    assert check.score_group(CONTEXT, [SPINS_FOREVER, MODERATE]) == [0.0, 0.75]
    assert check.last_reasons()[0] == "timed out: used its 0.5 s of CPU time"
    assert pids == []  # proven by its own CPU use, in the worker it ran in


# -- stopped by a limit, not shown to be the query's doing: again in a fresh worker, else unknown ------


def stop_new_workers(monkeypatch, count: int) -> list[int]:
    """The next ``count`` workers started are stopped (SIGSTOP) as soon as they are ready: a machine too
    busy to give the query any CPU before its wall-clock deadline."""
    stopped: list[int] = []
    start = SandboxProcess._worker

    def starving(self):
        was = self._process
        process = start(self)
        if process is not was and len(stopped) < count:
            os.kill(process.pid, signal.SIGSTOP)
            stopped.append(process.pid)
        return process

    monkeypatch.setattr(SandboxProcess, "_worker", starving)
    return stopped


def test_a_query_starved_of_cpu_runs_again_in_a_fresh_worker(verifier, monkeypatch):
    check = verifier(timeout_s=0.5)
    check.wall_s = 1.0  # the wall-clock limit, short for the test
    stopped = stop_new_workers(monkeypatch, 1)
    assert check.score_group(CONTEXT, [MODERATE]) == [1.0]  # its real result, from the second worker
    assert check.last_reasons() == [None]
    assert len(stopped) == 1 and check._sandbox._process.pid != stopped[0]  # the starved worker is gone


def test_a_query_starved_twice_is_unknown_not_0(verifier, monkeypatch):
    check = verifier(timeout_s=0.5)
    check.wall_s = 1.0
    stop_new_workers(monkeypatch, 2)
    [score] = check.score_group(CONTEXT, [MODERATE])
    assert isinstance(score, Failed), score
    assert "wall-clock" in score.reason or "did not stop" in score.reason, score.reason
    assert "not shown to be the query's doing" in score.reason
    assert check.score_group(CONTEXT, [MODERATE]) == [1.0]  # the next query runs as usual


def test_a_worker_killed_from_outside_mid_query_costs_the_query_nothing(verifier):
    check = verifier(timeout_s=2.0)
    check.score_group(CONTEXT, ["SELECT 1"])  # the worker is up
    pid = check._sandbox._process.pid
    killer = threading.Timer(0.1, os.kill, (pid, signal.SIGKILL))  # the machine's OOM killer, say
    killer.start()
    slow_but_fine = "SELECT count(*) FROM range(3000000) t(i) WHERE regexp_matches(i::VARCHAR, '9{4}')"
    try:
        assert check.score_group(CONTEXT, [slow_but_fine]) == [1.0]
    finally:
        killer.join()
    assert check.last_reasons() == [None] and check._sandbox._process.pid != pid


def test_running_out_of_memory_after_other_queries_is_checked_in_a_fresh_worker(verifier, monkeypatch):
    check = verifier(timeout_s=2.0, memory_limit="256MB")
    check.score_group(CONTEXT, ["SELECT 1"])  # the worker has run something before
    pids = starts_counted(monkeypatch)
    assert check.score_group(CONTEXT, [HUGE_LIST]) == [0.0]  # out of memory again in a fresh worker: proven
    assert "memory" in check.last_reasons()[0] or "died" in check.last_reasons()[0]
    assert len(pids) == 1  # one fresh worker, for the second run


def test_running_out_of_memory_in_a_fresh_worker_is_proof_enough(verifier, monkeypatch):
    check = verifier(timeout_s=2.0, memory_limit="256MB")
    pids = starts_counted(monkeypatch)
    started = time.monotonic()
    assert check.score_group(CONTEXT, [HUGE_LIST]) == [0.0]
    assert len(pids) == 1, pids  # the first query of its worker: no second run
    assert time.monotonic() - started < check.wall_s + 3.0

"""SqlExecutionVerifier against a small real DuckDB file: agreement, refusals, sandboxing, timeouts."""

from __future__ import annotations

import hashlib
import importlib
import time

import duckdb
import pytest

from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import SCORER_CLASSES
from tao_pipeline.scoring.sql import SANDBOX_SETTINGS, SqlExecutionVerifier, extract_sql, results_agree

CONTEXT = PromptContext(prompt="How many employees does each department have?", task="sql")

COUNT_BY_DEPARTMENT = [
    "```sql\nSELECT d.name, count(*) FROM employees e JOIN departments d ON e.dept_id = d.id GROUP BY d.name\n```",
    "The query:\nSELECT d.name, COUNT(e.id) AS n\nFROM departments d JOIN employees e ON e.dept_id = d.id\nGROUP BY 1;",
    "WITH c AS (SELECT dept_id, count(*) AS n FROM employees GROUP BY dept_id)\n"
    "SELECT d.name, c.n FROM c JOIN departments d ON d.id = c.dept_id ORDER BY c.n",
]
WRONG_CROSS_JOIN = "SELECT d.name, count(*) FROM employees e, departments d GROUP BY d.name"
SYNTAX_ERROR = "```sql\nSELECT name FROM employees WHERE\n```"


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "company.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE departments (id INTEGER, name VARCHAR)")
        connection.execute("INSERT INTO departments VALUES (1, 'sales'), (2, 'research'), (3, 'support')")
        connection.execute("CREATE TABLE employees (id INTEGER, name VARCHAR, dept_id INTEGER, salary DOUBLE)")
        connection.execute(
            "INSERT INTO employees VALUES (1, 'ada', 1, 100.1), (2, 'bob', 1, 90.2), "
            "(3, 'cy', 2, 120.3), (4, 'di', 3, 80.4), (5, 'ed', 2, 110.5)"
        )
    return path


@pytest.fixture
def verifier(database):
    return SqlExecutionVerifier(database=str(database), timeout_s=1.0)


def fingerprint(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_agreeing_correct_queries_outscore_a_wrong_one_and_a_syntax_error(verifier):
    scores = verifier.score_group(CONTEXT, [*COUNT_BY_DEPARTMENT, WRONG_CROSS_JOIN, SYNTAX_ERROR])
    assert scores[:3] == pytest.approx([0.5 + 0.5 * 3 / 5] * 3)
    assert scores[3] == pytest.approx(0.5 + 0.5 * 1 / 5)
    assert scores[4] == 0.0
    reasons = verifier.last_reasons()
    assert reasons[:4] == [None] * 4
    assert reasons[4].startswith("syntax error")


def test_execution_weight_sets_the_share_of_running(database):
    verifier = SqlExecutionVerifier(database=database, execution_weight=1.0)
    assert verifier.score_group(CONTEXT, [COUNT_BY_DEPARTMENT[0], WRONG_CROSS_JOIN]) == [1.0, 1.0]


def test_results_compare_rounded_and_in_order_only_when_both_queries_order(verifier):
    def outcome(sql):
        return verifier.run_candidate(sql)

    assert results_agree(
        outcome("SELECT avg(salary) FROM employees"), outcome("SELECT sum(salary) / count(*) FROM employees")
    )
    assert results_agree(outcome("SELECT 0.1 + 0.2"), outcome("SELECT 0.3::DOUBLE"))
    ascending = outcome("SELECT name FROM employees ORDER BY salary")
    descending = outcome("SELECT name FROM employees ORDER BY salary DESC")
    unordered = outcome("SELECT name FROM employees")
    windowed = outcome("SELECT name FROM (SELECT name, row_number() OVER (ORDER BY salary) FROM employees)")
    assert not results_agree(ascending, descending)
    assert results_agree(ascending, unordered) and results_agree(descending, unordered)
    assert not windowed.ordered and results_agree(windowed, descending)


def test_multiple_statements_and_missing_sql_are_refused(verifier):
    scores = verifier.score_group(CONTEXT, ["```sql\nSELECT 1; SELECT 2\n```", "I do not know.", ""])
    assert scores == [0.0, 0.0, 0.0]
    reasons = verifier.last_reasons()
    assert "one statement" in reasons[0]
    assert reasons[1] == reasons[2] == "no SQL query found in the response"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("```SQL\nSELECT 1;\n```\nThen ```sql\nSELECT 2\n```", "SELECT 1"),
        ("Try this:\n  select a\n  from t;\n\nIt counts rows.", "select a\n  from t"),
        ("With the table below, run:\nWITH x AS (SELECT 1) SELECT * FROM x;", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("With care, nothing to query.", None),
    ],
)
def test_extract_sql(response, expected):
    assert extract_sql(response) == expected


DANGEROUS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY employees TO '{tmp}/leak.csv'",
    "ATTACH '{tmp}/other.db'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE x AS SELECT 1",
    "SET enable_external_access = true",
]


@pytest.mark.parametrize("statement", DANGEROUS)
def test_dangerous_statements_are_refused_and_have_no_effect(verifier, database, tmp_path, statement):
    sql = statement.format(tmp=tmp_path)
    before = fingerprint(database)
    assert verifier.score_group(CONTEXT, [f"```sql\n{sql}\n```"]) == [0.0]
    assert any(word in verifier.last_reasons()[0] for word in ("refused", "Permission"))
    # Defence in depth: the sandbox connection itself rejects the statement, filter or not.
    with verifier.open_sandbox() as connection, pytest.raises(duckdb.Error):
        connection.execute(sql).fetchall()
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.db").exists()
    assert fingerprint(database) == before
    with duckdb.connect(str(database), read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM information_schema.tables").fetchone() == (2,)


def test_sandbox_settings_are_locked(verifier):
    with verifier.open_sandbox() as connection:
        settings = dict(connection.execute("SELECT name, value FROM duckdb_settings()").fetchall())
        with pytest.raises(duckdb.Error, match="locked"):
            connection.execute("SET autoload_known_extensions = true")
    switched_off = [name for name, value in SANDBOX_SETTINGS.items() if value is False]
    assert "enable_external_access" in switched_off and "autoload_known_extensions" in switched_off
    assert {name: settings[name] for name in switched_off} == dict.fromkeys(switched_off, "false")
    assert settings["max_temp_directory_size"] == "0 bytes"
    assert settings["lock_configuration"] == "true"
    assert settings["access_mode"] == "read_only"
    assert settings["enable_progress_bar"] == "false"


def test_a_long_query_is_interrupted_near_the_time_limit(verifier):
    started = time.monotonic()
    scores = verifier.score_group(
        CONTEXT,
        [
            # CPU-bound but memory-light, so the time limit and not the memory limit stops it
            "SELECT count(*) FROM range(1000000) a CROSS JOIN range(1000000) b WHERE a.range + b.range = -1",
            COUNT_BY_DEPARTMENT[0],
        ],
    )
    assert time.monotonic() - started < verifier.wall_s + 3.0  # CPU time, so longer on a busy machine
    assert scores[0] == 0.0 and scores[1] == pytest.approx(0.75)  # it used its whole CPU budget: its own doing
    assert verifier.last_reasons()[0] == "timed out: used its 1 s of CPU time"


def test_a_result_over_max_rows_ran_but_does_not_vote(database):
    verifier = SqlExecutionVerifier(database=database, max_rows=3)
    scores = verifier.score_group(CONTEXT, ["SELECT * FROM range(10)", "SELECT * FROM range(10)"])
    assert scores == [0.5, 0.5]
    assert verifier.last_reasons() == ["result has more than 3 rows"] * 2


def test_the_database_is_opened_read_only_and_left_unchanged(verifier, database):
    before = fingerprint(database)
    verifier.score_group(CONTEXT, [*COUNT_BY_DEPARTMENT, WRONG_CROSS_JOIN])
    assert fingerprint(database) == before
    with duckdb.connect(str(database)) as writer:  # no lock is left behind
        writer.execute("INSERT INTO departments VALUES (4, 'legal')")


def test_an_unreadable_database_fails_each_response_without_raising(verifier, database):
    database.unlink()
    scores = verifier.score_group(CONTEXT, ["SELECT 1", "SELECT 2"])
    assert all(isinstance(score, Failed) and "sql_execution" in score.reason for score in scores)


def test_the_database_option_is_checked_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="scoring.options.sql_execution.database"):
        SqlExecutionVerifier(database=str(tmp_path / "missing.duckdb"))
    with pytest.raises(ValueError, match="scoring.options.sql_execution.database"):
        SqlExecutionVerifier()


def test_registry_names_this_class():
    module_name, class_name = SCORER_CLASSES["sql_execution"].split(":")
    scorer_class = getattr(importlib.import_module(module_name), class_name)
    assert scorer_class is SqlExecutionVerifier and scorer_class.name == "sql_execution"


# -- queries that escape DuckDB's own limits: the operating system stops them ------------------------

ESCAPES_DUCKDB = [
    "SELECT len(list(range(400000000)))",  # a huge list: allocated outside the buffer manager
    "SELECT length(repeat('x', 4000000000))",  # a 4 GB string
    "SELECT length(string_agg(repeat('x', 100000), '')) FROM range(100000)",  # 10 GB by aggregation
    "SELECT regexp_matches(repeat('ab', 300000000), '(a|b)*c')",  # a regex over a 600 MB string
    "SELECT count(*) FROM range(200000000) t(i) WHERE regexp_matches(i::VARCHAR, '9{5}')",  # long, CPU
]


@pytest.mark.parametrize("sql", ESCAPES_DUCKDB)
def test_memory_and_time_are_enforced_by_the_operating_system(database, sql):
    import psutil

    verifier = SqlExecutionVerifier(database=str(database), timeout_s=1.0, memory_limit="256MB")
    before = psutil.Process().memory_info().rss
    started = time.monotonic()
    [score] = verifier.score_group(CONTEXT, [f"```sql\n{sql}\n```"])
    elapsed = time.monotonic() - started
    [reason] = verifier.last_reasons()
    assert score == 0.0 and reason, reason  # the candidate's query failed: 0, with why (not a scorer failure)
    assert any(word in reason for word in ("timed out", "memory", "died")), reason
    assert elapsed < verifier.wall_s + 4.0, (elapsed, reason)  # not "40 s past a 2 s limit"
    assert psutil.Process().memory_info().rss - before < 100 * 2**20  # none of it in this process
    # The verifier goes on: the next query runs (in a fresh worker if that one was killed).
    assert verifier.score_group(CONTEXT, [COUNT_BY_DEPARTMENT[0]]) == [1.0]
    verifier.close()


def test_the_worker_runs_under_hard_limits(database):
    import psutil

    verifier = SqlExecutionVerifier(database=str(database), timeout_s=1.0, memory_limit="256MB")
    verifier.score_group(CONTEXT, [COUNT_BY_DEPARTMENT[0]])
    worker = psutil.Process(verifier._sandbox._process.pid)
    data_soft, data_hard = worker.rlimit(psutil.RLIMIT_DATA)
    assert data_soft == data_hard == 256 * 10**6 + 512 * 2**20
    assert worker.rlimit(psutil.RLIMIT_CPU)[0] > 0
    assert worker.num_threads() <= 4  # one DuckDB thread (plus the interpreter's own)
    verifier.close()
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


def test_a_bad_memory_limit_is_named(database):
    with pytest.raises(ValueError, match="scoring.options.sql_execution.memory_limit"):
        SqlExecutionVerifier(database=str(database), memory_limit="lots")


def test_a_query_that_ignores_the_interrupt_is_killed_with_its_process(database):
    """One regular-expression call over a 100 MB string does not look at DuckDB's interrupt for ~12 s here."""
    verifier = SqlExecutionVerifier(database=str(database), timeout_s=1.0, memory_limit="1GB")
    verifier.score_group(CONTEXT, [COUNT_BY_DEPARTMENT[0]])  # the worker is up
    started = time.monotonic()
    sql = "SELECT length(regexp_replace(repeat('ab', 50000000), '(a|b)', 'xyz', 'g'))"
    assert verifier.score_group(CONTEXT, [f"```sql\n{sql}\n```"]) == [0.0]
    assert time.monotonic() - started < verifier.wall_s + 3.0
    reason = verifier.last_reasons()[0]  # the kernel's CPU rlimit, or the parent at the wall-clock deadline
    assert reason.startswith("timed out") and "kill" in reason, reason
    assert verifier.score_group(CONTEXT, [COUNT_BY_DEPARTMENT[0]]) == [1.0]  # a fresh worker
    verifier.close()

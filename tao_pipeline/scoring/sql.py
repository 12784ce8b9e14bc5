"""SQL execution verifier: run each candidate query in a locked-down, read-only DuckDB and vote on results."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

import duckdb

from tao_pipeline.scoring.base import Failed, PromptContext, Score

DATABASE_OPTION = "scoring.options.sql_execution.database"

# Settings of every sandbox connection; sandbox_config adds `lock_configuration`, after which
# SET/RESET of these (or any other global option) fails. DuckDB does not apply them in dict order,
# so settings that external access guards (e.g. temp_directory) cannot be among them.
SANDBOX_SETTINGS: dict[str, Any] = {
    "enable_external_access": False,  # no file/network reads or writes, COPY, ATTACH, INSTALL, LOAD
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "allow_persistent_secrets": False,
    "python_enable_replacements": False,  # else `FROM name` could scan a Python variable of this process
    "max_temp_directory_size": "0B",  # never spill to disk
}
# Known to newer DuckDB releases only; applied where the running version has them.
OPTIONAL_SANDBOX_SETTINGS: dict[str, Any] = {
    "allow_extension_repositories": "forbidden",
    # The progress bar is a per-connection setting, so it can only be turned off after the lock.
    "allowed_configs": ["enable_progress_bar"],
}

_SQL_FENCE = re.compile(r"```[ \t]*sql[^\n]*\n(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)
_STATEMENT_START = re.compile(
    r"^[ \t]*(?:SELECT\s|WITH\s+(?:RECURSIVE\s+)?\"?\w+\"?\s*(?:\([^)]*\))?\s*AS\b)",
    re.IGNORECASE | re.MULTILINE,
)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class QueryOutcome:
    """What running one candidate gave. ``rows`` is None when it did not run or has no vote; ``reason`` says why."""

    sql: str | None
    ran: bool = False
    rows: tuple[tuple, ...] | None = None
    ordered: bool = False
    reason: str | None = None

    @cached_property
    def row_counts(self) -> Counter:
        return Counter(self.rows or ())


class SqlExecutionVerifier:
    """Executes each candidate's SQL against a user-supplied DuckDB file and rewards queries that run and agree.

    Needs ``database``: a DuckDB file, opened read-only with external access, extension
    installation/loading and configuration changes disabled (``SANDBOX_SETTINGS``). Only a single
    query statement (SELECT / WITH / VALUES / FROM / DESCRIBE / SUMMARIZE) is run; anything else is
    refused. Score = ``execution_weight`` x (it ran) + (1 - ``execution_weight``) x share of the
    group's candidates whose result equals this one's (rows compared as a multiset, in order only
    when both queries end in ORDER BY; floats rounded to 6 places). A query that does not parse,
    fails, is refused, or runs past ``timeout_s`` seconds scores 0; ``last_reasons()`` says why.
    A result over ``max_rows`` rows counts as run but does not vote. ``memory_limit`` caps the
    memory one query may use.
    """

    name = "sql_execution"

    def __init__(
        self,
        *,
        database: str | Path | None = None,
        timeout_s: float = 2.0,
        max_rows: int = 1000,
        execution_weight: float = 0.5,
        memory_limit: str = "1GB",
    ):
        self.database = _existing_database(database)
        if timeout_s <= 0 or max_rows < 1 or not 0.0 <= execution_weight <= 1.0:
            raise ValueError(
                "scoring.options.sql_execution: need timeout_s > 0, max_rows >= 1, "
                f"0 <= execution_weight <= 1; got {timeout_s}, {max_rows}, {execution_weight}"
            )
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.execution_weight = execution_weight
        self.config = sandbox_config(memory_limit)
        self._reasons: list[str | None] = []
        self.open_sandbox().close()  # fail at construction, not mid-round, on a file DuckDB cannot open

    def open_sandbox(self) -> duckdb.DuckDBPyConnection:
        connection = duckdb.connect(str(self.database), read_only=True, config=self.config)
        if "allowed_configs" in self.config:
            connection.execute("SET enable_progress_bar = false")  # else slow queries draw one on the terminal
        return connection

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        outcomes = [self._outcome_or_failed(response) for response in responses]
        self._reasons = [outcome.reason for outcome in outcomes]
        return [o if isinstance(o, Failed) else self._score(o, outcomes) for o in outcomes]

    def last_reasons(self) -> list[str | None]:
        """Per response of the last group: None when its query ran and voted, else why it did not."""
        return list(self._reasons)

    def _score(self, outcome: QueryOutcome, outcomes: list[QueryOutcome | Failed]) -> float:
        if not outcome.ran:
            return 0.0
        agreeing = sum(1 for other in outcomes if isinstance(other, QueryOutcome) and results_agree(outcome, other))
        return self.execution_weight + (1.0 - self.execution_weight) * agreeing / len(outcomes)

    def _outcome_or_failed(self, response: str) -> QueryOutcome | Failed:
        try:
            return self.run_candidate(response)
        except Exception as error:  # noqa: BLE001 - a scorer error on one response is recorded, not raised
            return Failed(f"{self.name}: {type(error).__name__}: {error}"[:300])

    def run_candidate(self, response: str) -> QueryOutcome:
        sql = extract_sql(response)
        if sql is None:
            return QueryOutcome(None, reason="no SQL query found in the response")
        connection = self.open_sandbox()  # a fresh connection per candidate: nothing carries over
        try:
            refusal = refusal_reason(connection, sql)
            if refusal:
                return QueryOutcome(sql, reason=refusal)
            return self._execute(connection, sql, has_top_level_order(connection, sql))
        finally:
            connection.close()

    def _execute(self, connection: duckdb.DuckDBPyConnection, sql: str, ordered: bool) -> QueryOutcome:
        timed_out = threading.Event()

        def interrupt() -> None:
            timed_out.set()
            connection.interrupt()

        timer = threading.Timer(self.timeout_s, interrupt)
        timer.start()
        try:
            rows = connection.execute(sql).fetchmany(self.max_rows + 1)
        except duckdb.Error as error:
            if timed_out.is_set():
                return QueryOutcome(sql, reason=f"timed out after {self.timeout_s} s")
            return QueryOutcome(sql, reason=f"execution error: {type(error).__name__}: {error}"[:300])
        finally:
            timer.cancel()
            timer.join()  # never let the timer touch the connection once it is closed
        if len(rows) > self.max_rows:
            return QueryOutcome(sql, ran=True, reason=f"result has more than {self.max_rows} rows")
        return QueryOutcome(sql, ran=True, rows=tuple(normalise_row(row) for row in rows), ordered=ordered)


def sandbox_config(memory_limit: str) -> dict[str, Any]:
    known = _known_settings()
    optional = {k: v for k, v in OPTIONAL_SANDBOX_SETTINGS.items() if k in known}
    return {**SANDBOX_SETTINGS, **optional, "memory_limit": memory_limit, "lock_configuration": True}


def _known_settings() -> set[str]:
    with duckdb.connect(":memory:") as probe:
        return {row[0] for row in probe.execute("SELECT name FROM duckdb_settings()").fetchall()}


def _existing_database(database: str | Path | None) -> Path:
    if database is None:
        raise ValueError(f"{DATABASE_OPTION} is required: the DuckDB file the candidate queries run against")
    path = Path(database).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{DATABASE_OPTION}: no DuckDB file at {path}")
    return path


def extract_sql(response: str) -> str | None:
    """The first ```sql block, else the text from the first line starting with SELECT/WITH to a blank line."""
    fence = _SQL_FENCE.search(response)
    if fence:
        text = fence.group(1)
    else:
        start = _STATEMENT_START.search(response)
        if start is None:
            return None
        text = _BLANK_LINE.split(response[start.start() :], maxsplit=1)[0]
    text = text.strip().rstrip(";").strip()
    return text or None


def refusal_reason(connection: duckdb.DuckDBPyConnection, sql: str) -> str | None:
    """Why this SQL must not run (syntax error, several statements, not a query), or None when it may."""
    try:
        statements = connection.extract_statements(sql)
    except duckdb.Error as error:
        return f"syntax error: {error}"[:300]
    if len(statements) != 1:
        return f"refused: expected one statement, found {len(statements)}"
    if statements[0].type != duckdb.StatementType.SELECT:
        return f"refused: {statements[0].type.name} statements are not allowed, only queries"
    return None


def has_top_level_order(connection: duckdb.DuckDBPyConnection, sql: str) -> bool:
    """Does the outermost query end in ORDER BY (not a window's or a subquery's)?"""
    try:
        tree = json.loads(connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    except duckdb.Error:  # a build without the json functions: compare as multisets
        return False
    if tree.get("error"):
        return False
    modifiers = tree["statements"][0]["node"].get("modifiers", [])
    return any(modifier["type"] == "ORDER_MODIFIER" for modifier in modifiers)


def normalise_row(row: tuple) -> tuple:
    return tuple(normalise_value(value) for value in row)


def normalise_value(value: Any) -> Any:
    """A hashable, comparable value: floats and decimals rounded to 6 places, containers as tuples."""
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else round(value, 6)
    if isinstance(value, (list, tuple)):
        return tuple(normalise_value(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted(((repr(k), normalise_value(v)) for k, v in value.items()), key=lambda item: item[0]))
    return value


def results_agree(first: QueryOutcome, second: QueryOutcome) -> bool:
    if first.rows is None or second.rows is None:
        return False
    if first.ordered and second.ordered:
        return first.rows == second.rows
    return first.row_counts == second.row_counts

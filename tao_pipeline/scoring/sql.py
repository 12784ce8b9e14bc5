"""SQL execution verifier: run each candidate query in a locked-down, read-only DuckDB and vote on results."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated

import duckdb
from pydantic import Field

from tao_pipeline.scoring.base import Failed, PromptContext, Score, Share, TimeoutSeconds, scorer_options
from tao_pipeline.scoring.sql_query import SANDBOX_SETTINGS, open_sandbox, sandbox_config
from tao_pipeline.scoring.sql_sandbox import SandboxProcess, parse_size

__all__ = ["SANDBOX_SETTINGS", "QueryOutcome", "SqlExecutionVerifier", "extract_sql", "results_agree"]
# A query may take this many times its CPU budget in wall-clock time (a busy machine) before it is stopped,
# and never less than its budget plus WALL_SLACK_S.
WALL_FACTOR, WALL_SLACK_S = 3.0, 5.0
MIN_MEMORY_BYTES, MAX_MEMORY_BYTES = 16 * 2**20, 2**40  # below, DuckDB cannot open a database; above, a typo

DATABASE_OPTION = "scoring.options.sql_execution.database"
MEMORY_OPTION = "scoring.options.sql_execution.memory_limit"

_SQL_FENCE = re.compile(r"```[ \t]*sql[^\n]*\n(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)
_STATEMENT_START = re.compile(
    r"^[ \t]*(?:SELECT\s|WITH\s+(?:RECURSIVE\s+)?\"?\w+\"?\s*(?:\([^)]*\))?\s*AS\b)",
    re.IGNORECASE | re.MULTILINE,
)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class QueryOutcome:
    """What running one candidate gave. ``rows`` is None when it did not run or has no vote; ``reason`` says why.

    Rows are canonical JSON text of the normalised values (floats rounded, containers as lists),
    so equal results compare equal.
    """

    sql: str | None
    ran: bool = False
    rows: tuple[str, ...] | None = None
    ordered: bool = False
    reason: str | None = None

    @cached_property
    def row_counts(self) -> Counter:
        return Counter(self.rows or ())


class SqlExecutionVerifier:
    """Executes each candidate's SQL against a user-supplied DuckDB file and rewards queries that run and agree.

    Needs ``database``: a DuckDB file, opened read-only with external access, extension
    installation/loading and configuration changes disabled (``SANDBOX_SETTINGS``), in a worker
    process whose memory (``memory_limit`` plus a runtime allowance) and time (``timeout_s``) the
    operating system enforces (:mod:`.sql_sandbox`). Only a single query statement (SELECT / WITH /
    VALUES / FROM / DESCRIBE / SUMMARIZE) is run; anything else is refused. Score =
    ``execution_weight`` x (it ran) + (1 - ``execution_weight``) x share of the group's candidates
    whose result equals this one's (rows compared as a multiset, in order only when both queries
    end in ORDER BY; floats rounded to 6 places). A query that does not parse, fails or is refused
    scores 0; ``last_reasons()`` says why. A result over ``max_rows`` rows counts as run but does
    not vote.

    ``timeout_s`` is each query's own CPU-time budget (what earlier queries used never counts); a
    query also stops after ``max(3 x timeout_s, timeout_s + 5)`` seconds of wall-clock time. A
    query stopped by a limit of the verifier's scores 0 only when it is shown to be the cause: it
    used its whole CPU budget, or it ran out of memory in a worker that had run nothing before.
    Otherwise (stopped by the wall clock on a busy machine, out of memory after other queries, a
    worker killed from outside) it runs again in a fresh worker; if it cannot be shown there
    either, its score is unknown (Failed), never 0.
    """

    name = "sql_execution"

    @scorer_options
    def __init__(
        self,
        *,
        database: str | Path | None = None,
        timeout_s: TimeoutSeconds = 2.0,
        max_rows: Annotated[int, Field(ge=1, le=10_000_000)] = 1000,
        execution_weight: Share = 0.5,
        memory_limit: str = "1GB",
    ):
        try:
            memory_bytes = parse_size(memory_limit)
        except ValueError as error:
            raise ValueError(f"{MEMORY_OPTION}: {error}") from None
        if not MIN_MEMORY_BYTES <= memory_bytes <= MAX_MEMORY_BYTES:
            raise ValueError(f"{MEMORY_OPTION}: {memory_limit!r} is not between 16MiB and 1TiB")
        self.database = _existing_database(database)
        self.timeout_s = timeout_s
        self.wall_s = max(WALL_FACTOR * timeout_s, timeout_s + WALL_SLACK_S)
        self.max_rows = max_rows
        self.execution_weight = execution_weight
        self.config = sandbox_config(memory_limit)
        self._reasons: list[str | None] = []
        try:
            self.open_sandbox().close()  # fail at construction, not mid-round, on a file DuckDB cannot open
        except duckdb.Error as error:
            raise ValueError(f"{DATABASE_OPTION}: cannot open {self.database}: {_open_problem(error)}") from None
        self._sandbox = SandboxProcess(self.database, self.config, memory_bytes)

    def open_sandbox(self) -> duckdb.DuckDBPyConnection:
        """A sandbox connection in this process (for inspection; candidates run in the worker)."""
        return open_sandbox(self.database, self.config)

    def close(self) -> None:
        self._sandbox.close()

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
        answer = self._run(sql)
        if answer.get("limit") and not _query_is_the_cause(answer):
            self._sandbox.close()  # again, in a fresh worker with the full budget
            answer = self._run(sql)
            if answer.get("limit") and not _query_is_the_cause(answer):
                raise LimitNotProven(f"{answer['reason']}, twice, and not shown to be the query's doing")
        rows = answer.get("rows")
        return QueryOutcome(
            sql, answer.get("ran", False), tuple(rows) if rows is not None else None, answer.get("ordered", False),
            answer.get("reason"),
        )  # fmt: skip

    def _run(self, sql: str) -> dict:
        answer = self._sandbox.run(sql, self.max_rows, self.timeout_s, self.wall_s)
        if "error" in answer:
            raise RuntimeError(answer["error"])  # the scorer failed here, not the candidate: unknown
        return answer


class LimitNotProven(RuntimeError):
    """A query was stopped by the verifier's limits, but nothing shows the query was the cause: unknown."""


def _query_is_the_cause(answer: dict) -> bool:
    """Did the query itself exhaust a limit? Its CPU budget (its own: earlier queries do not count), or
    memory in a worker that had run nothing before it. A wall-clock stop or an outside kill shows nothing."""
    if answer["limit"] == "cpu":
        return True
    return answer["limit"] == "memory" and answer.get("fresh", False)


def _existing_database(database: str | Path | None) -> Path:
    """The database option's file, once it is shown to be a DuckDB database file (a regular file, starting
    with DuckDB's header): a missing file, a folder, a FIFO, a SQLite or junk file is named here, in one line."""
    if database is None or not str(database).strip():
        raise ValueError(f"{DATABASE_OPTION} is required: the DuckDB file the candidate queries run against")
    path = Path(database).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{DATABASE_OPTION}: no DuckDB file at {path}")
    if not path.is_file():
        raise ValueError(f"{DATABASE_OPTION}: {path} is not a file")
    try:
        with path.open("rb") as file:
            header = file.read(len(DUCKDB_MAGIC) + DUCKDB_MAGIC_OFFSET)
    except OSError as error:
        raise ValueError(f"{DATABASE_OPTION}: cannot read {path}: {error.strerror}") from None
    if header[DUCKDB_MAGIC_OFFSET:] != DUCKDB_MAGIC:
        raise ValueError(f"{DATABASE_OPTION}: {path} is not a DuckDB database file")
    return path


DUCKDB_MAGIC, DUCKDB_MAGIC_OFFSET = b"DUCK", 8  # a DuckDB file: an 8-byte checksum, then "DUCK"


def _open_problem(error: duckdb.Error) -> str:
    """What stops DuckDB opening the file, in one line (its messages can run to several)."""
    text = str(error)
    if "lock" in text.lower():
        return "another process holds it open for writing (close it, or point this option at a copy)"
    return text.splitlines()[0][:200] if text else type(error).__name__


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


def results_agree(first: QueryOutcome, second: QueryOutcome) -> bool:
    if first.rows is None or second.rows is None:
        return False
    if first.ordered and second.ordered:
        return first.rows == second.rows
    return first.row_counts == second.row_counts

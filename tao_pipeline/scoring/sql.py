"""SQL execution verifier: run each candidate query in a locked-down, read-only DuckDB and vote on results."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import duckdb

from tao_pipeline.scoring.base import Failed, PromptContext, Score
from tao_pipeline.scoring.sql_query import SANDBOX_SETTINGS, open_sandbox, sandbox_config
from tao_pipeline.scoring.sql_sandbox import SandboxProcess, parse_size

__all__ = ["SANDBOX_SETTINGS", "QueryOutcome", "SqlExecutionVerifier", "extract_sql", "results_agree"]
KILL_GRACE_S = 1.0

DATABASE_OPTION = "scoring.options.sql_execution.database"

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
    end in ORDER BY; floats rounded to 6 places). A query that does not parse, fails, is refused,
    runs past ``timeout_s`` seconds or past its memory scores 0; ``last_reasons()`` says why. A
    result over ``max_rows`` rows counts as run but does not vote.
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
        try:
            memory_bytes = parse_size(memory_limit)
        except ValueError as error:
            raise ValueError(f"scoring.options.sql_execution.memory_limit: {error}") from None
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.execution_weight = execution_weight
        self.config = sandbox_config(memory_limit)
        self._reasons: list[str | None] = []
        self.open_sandbox().close()  # fail at construction, not mid-round, on a file DuckDB cannot open
        # The worker's own interrupt fires at timeout_s; the operating system's kill a second later.
        self._sandbox = SandboxProcess(self.database, self.config, memory_bytes, timeout_s + KILL_GRACE_S)

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
        answer = self._sandbox.run(sql, self.max_rows, self.timeout_s)
        if "error" in answer:
            raise RuntimeError(answer["error"])  # the scorer failed here, not the candidate: unknown
        rows = answer.get("rows")
        return QueryOutcome(
            sql, answer.get("ran", False), tuple(rows) if rows is not None else None, answer.get("ordered", False),
            answer.get("reason"),
        )  # fmt: skip


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


def results_agree(first: QueryOutcome, second: QueryOutcome) -> bool:
    if first.rows is None or second.rows is None:
        return False
    if first.ordered and second.ordered:
        return first.rows == second.rows
    return first.row_counts == second.row_counts

"""Running one query in a locked-down, read-only DuckDB connection: what the sandbox worker does.

The verifier (:mod:`.sql`) never runs model-written SQL in its own process; its worker
(:mod:`.sql_sandbox`) calls :func:`execute_in_sandbox` under the operating system's limits.
"""

from __future__ import annotations

import json
import math
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

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
    "threads": 1,  # the worker's memory limit then bounds one query, not one per thread
}
# Known to newer DuckDB releases only; applied where the running version has them.
OPTIONAL_SANDBOX_SETTINGS: dict[str, Any] = {
    "allow_extension_repositories": "forbidden",
    # The progress bar is a per-connection setting, so it can only be turned off after the lock.
    "allowed_configs": ["enable_progress_bar"],
}


def sandbox_config(memory_limit: str) -> dict[str, Any]:
    known = _known_settings()
    optional = {k: v for k, v in OPTIONAL_SANDBOX_SETTINGS.items() if k in known}
    return {**SANDBOX_SETTINGS, **optional, "memory_limit": memory_limit, "lock_configuration": True}


def _known_settings() -> set[str]:
    with duckdb.connect(":memory:") as probe:
        return {row[0] for row in probe.execute("SELECT name FROM duckdb_settings()").fetchall()}


def open_sandbox(database: Path | str, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    """A fresh read-only connection with the sandbox's locked settings: nothing carries over between queries."""
    connection = duckdb.connect(str(database), read_only=True, config=config)
    if "allowed_configs" in config:
        connection.execute("SET enable_progress_bar = false")  # else slow queries draw one on the terminal
    return connection


def execute_in_sandbox(
    database: str, config: dict[str, Any], sql: str, max_rows: int, cpu_s: float, wall_s: float
) -> dict:
    """Refuse, or run, one query; its rows normalised and serialised so that equal results compare equal.

    DuckDB is interrupted once the query has used ``cpu_s`` seconds of CPU (its own budget: what
    earlier queries used does not count), or after ``wall_s`` seconds of wall-clock time, where it
    checks for interrupts; the operating system and the worker's parent stop it wherever it does not.
    An answer stopped by a limit says which (``limit``: "cpu", "wall" or "memory").
    """
    try:
        connection = open_sandbox(database, config)
    except duckdb.Error as error:  # the scorer's problem (a database gone), not the candidate's
        return {"error": f"cannot open {database}: {type(error).__name__}: {error}"[:300]}
    try:
        refusal = refusal_reason(connection, sql)
        if refusal:
            return {"ran": False, "reason": refusal}
        ordered = has_top_level_order(connection, sql)
        return _run(connection, sql, max_rows, cpu_s, wall_s) | {"ordered": ordered}
    finally:
        connection.close()


WATCH_INTERVAL_S = 0.02


def _run(connection: duckdb.DuckDBPyConnection, sql: str, max_rows: int, cpu_s: float, wall_s: float) -> dict:
    done, stopped = threading.Event(), []

    def watch() -> None:  # DuckDB releases the GIL while it runs, so this thread sees the clocks move
        cpu_start, wall_start = time.process_time(), time.monotonic()
        while not done.wait(WATCH_INTERVAL_S):
            if time.process_time() - cpu_start >= cpu_s:
                stopped.append("cpu")
            elif time.monotonic() - wall_start >= wall_s:
                stopped.append("wall")
            else:
                continue
            connection.interrupt()
            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = connection.execute(sql).fetchmany(max_rows + 1)
    except duckdb.OutOfMemoryException:
        return {"ran": False, "limit": "memory", "reason": "ran out of its memory limit"}
    except duckdb.Error as error:
        if stopped:
            return {"ran": False, "limit": stopped[0], "reason": _stopped_reason(stopped[0], cpu_s, wall_s)}
        return {"ran": False, "reason": f"execution error: {type(error).__name__}: {error}"[:300]}
    finally:
        done.set()
        watcher.join()  # never let the watcher touch the connection once it is closed
    if len(rows) > max_rows:
        return {"ran": True, "reason": f"result has more than {max_rows} rows"}
    return {"ran": True, "rows": [json.dumps(normalise_row(row), default=repr) for row in rows]}


def _stopped_reason(limit: str, cpu_s: float, wall_s: float) -> str:
    if limit == "cpu":
        return f"timed out: used its {cpu_s:g} s of CPU time"
    return f"stopped after {wall_s:g} s of wall-clock time without using its {cpu_s:g} s of CPU time"


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

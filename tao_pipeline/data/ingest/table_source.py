"""A DuckDB table the app appends usage logs to, exported batch by batch into Parquet files for ingestion."""

from __future__ import annotations

from pathlib import Path

import duckdb

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.hashing import content_hash
from tao_pipeline.data.lake import connect_duckdb


class TableSourceError(ValueError):
    """The table source cannot be read as configured; the message names the setting and the problem."""


def export_new_table_rows(database: Path, table: str, order_column: str, export_dir: Path) -> Path | None:
    """Copy rows appended to a DuckDB table since the last export into a Parquet file for ingestion.

    The high-water mark of ``order_column`` is kept in ``<export_dir>/<table>.cursor`` and only
    advanced after the file is in place, so a crash re-exports the same rows into a file with
    the same content, which ingestion then recognises by its hash.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    cursor_file = export_dir / f"{table}.cursor"
    after = cursor_file.read_text().strip() if cursor_file.exists() else None
    if not Path(database).is_file():
        raise FileNotFoundError(f"flywheel.table_source.database {str(database)!r} does not exist")
    where = f'WHERE "{order_column}" > ?' if after is not None else ""
    try:
        with connect_duckdb(database, read_only=True, advice="check flywheel.table_source.database") as con:
            rows = con.execute(
                f'SELECT * FROM {_quoted(table)} {where} ORDER BY "{order_column}"',
                [after] if after is not None else [],
            ).df()
    except duckdb.Error as error:  # a missing table or column, a cursor of another type
        reason = " ".join(str(error).split())[:300]
        raise TableSourceError(
            f"flywheel.table_source: cannot read {table!r} ordered by {order_column!r} in {database}: {reason}"
        ) from None
    if rows.empty:
        return None
    high = str(rows[order_column].iloc[-1])
    target = export_dir / f"{table}-{content_hash(str(after), high)}.parquet"
    with atomic_path(target) as staging:
        rows.to_parquet(staging, index=False)
    cursor_file.write_text(high)
    return target


def _quoted(table: str) -> str:
    return ".".join(f'"{part}"' for part in table.split("."))

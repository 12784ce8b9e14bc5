"""The lake: one Parquet file per table per round, plus a DuckDB catalog of views.

Parquet is the source of truth and every write is atomic (temp file, then rename), so a
reader never sees half a file. The catalog (``catalog.duckdb``) only holds views over the
Parquet globs, so any SQL client can query lineage across rounds. It is opened for a
moment per write and never held open across a long step.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CATALOG_FILE = "catalog.duckdb"
_LOCK_RETRIES = 20
_LOCK_WAIT_S = 0.25


class Lake:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    def path(self, table: str, partition: str) -> Path:
        return self.root / table / f"{partition}.parquet"

    def exists(self, table: str, partition: str) -> bool:
        return self.path(table, partition).is_file()

    def write(self, table: str, partition: str, frame: pd.DataFrame) -> Path:
        """Atomically write one partition of a table and refresh its catalog view."""
        target = self.path(table, partition)
        target.parent.mkdir(parents=True, exist_ok=True)
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{partition}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(arrow, tmp_name)
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        self.refresh_view(table)
        return target

    def read(self, table: str, partition: str) -> pd.DataFrame:
        path = self.path(table, partition)
        if not path.is_file():
            raise FileNotFoundError(f"lake table {table!r} has no partition {partition!r} (expected {path})")
        return pq.read_table(path).to_pandas()

    def partitions(self, table: str) -> list[str]:
        folder = self.root / table
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def scan(self, table: str, except_partition: str | None = None) -> str | None:
        """SQL reading every partition of a table (or all but one), or None if there is none."""
        files = [self.path(table, p) for p in self.partitions(table) if p != except_partition]
        if not files:
            return None
        listed = ", ".join(f"'{f.as_posix()}'" for f in files)
        return f"read_parquet([{listed}], union_by_name = true)"

    def sql(self, query: str) -> pd.DataFrame:
        """Run SQL over ``scan()`` expressions in an in-memory DuckDB (no catalog lock taken)."""
        with duckdb.connect() as con:
            return con.execute(query).df()

    def refresh_view(self, table: str) -> None:
        glob = (self.root / table / "*.parquet").as_posix()
        sql = (
            f'CREATE OR REPLACE VIEW "{table}" AS '
            f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
        )
        self._with_catalog(lambda con: con.execute(sql))

    def query(self, sql: str) -> pd.DataFrame:
        """Run read-only SQL against the catalog views."""
        return self._with_catalog(lambda con: con.execute(sql).df(), read_only=True)

    def _with_catalog(self, work, read_only: bool = False):
        # Another process (a concurrent run, a user's SQL shell) may hold the file lock briefly.
        self.root.mkdir(parents=True, exist_ok=True)
        if read_only and not self.catalog_path.exists():
            duckdb.connect(str(self.catalog_path)).close()
        for attempt in range(_LOCK_RETRIES):
            try:
                con = duckdb.connect(str(self.catalog_path), read_only=read_only)
            except duckdb.IOException:
                if attempt == _LOCK_RETRIES - 1:
                    raise
                time.sleep(_LOCK_WAIT_S)
                continue
            try:
                return work(con)
            finally:
                con.close()

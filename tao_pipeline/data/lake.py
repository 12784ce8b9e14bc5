"""The lake: one Parquet file per table per round, plus a DuckDB catalog of views.

Parquet is the source of truth and every write is atomic (temp file, then rename), so a
reader never sees half a file. The catalog (``catalog.duckdb``) only holds views over the
Parquet globs, so any SQL client can query lineage across rounds. It is opened for a
moment at a time and never held open across a long step; a view over a table's glob already
sees every new partition, so a write takes the catalog's write lock only when the view is
missing (a table's first partition, or a catalog that was deleted or moved).

Several processes (an ingest and a round, two rounds, a user's SQL shell) share the catalog
and the model registry: DuckDB lets one process write a file at a time, so ``connect_duckdb``
waits, with jittered backoff, for a conflicting lock to be released.

DuckDB opens a Parquet file more than once in one query (schema, then data), so a partition
replaced in the middle of a query can be read half old, half new: garbage rows or errors
such as "Out of buffer". ``sql`` and ``query`` therefore note the identity (inode, size, times)
of the partitions a query may read and run it again if any was replaced meanwhile; ``read``
reads a partition through one open file handle.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tao_pipeline.common.atomic import atomic_path

CATALOG_FILE = "catalog.duckdb"
# How long to wait for another process's lock on a DuckDB file before giving up; every holder in
# this project keeps it for milliseconds, so only a stuck process (or a user's open read-write
# shell) makes a wait this long.
LOCK_TIMEOUT_S = 120.0
_FIRST_WAIT_S, _MAX_WAIT_S = 0.005, 0.25
# How long a read keeps retrying while the partitions it reads keep being rewritten under it.
READ_RETRY_TIMEOUT_S = 60.0


class LakeReadConflict(RuntimeError):
    """A query's partitions were rewritten during every attempt to read them."""


class LakeFileError(OSError):
    """A lake file exists but cannot be read (truncated, corrupt); the message names it."""


def unreadable(path: Path, error: Exception) -> LakeFileError:
    reason = " ".join(str(error).split())[:200]
    return LakeFileError(
        f"lake file {path} cannot be read ({reason}): move it away and materialize that partition again "
        "(`tao doctor` lists every such file)"
    )


class DuckDBLockTimeout(TimeoutError):
    """Another process kept a DuckDB file locked for longer than the wait allowed."""


class DuckDBFileError(LakeFileError):
    """A DuckDB file (the catalog, the registry) exists but is not a database DuckDB can open."""


CATALOG_ADVICE = "it holds only views over the Parquet files: move it away, then `tao doctor --fix` rebuilds it"


_OTHER_PROCESS = "Could not set lock"  # "... Conflicting lock is held in <program> (PID n)"
_OTHER_THREAD = "different configuration than existing connections"  # this process, read-only vs read-write
_OTHER_THREAD_WAIT_S = 5.0  # a thread's statement ends soon; a connection this process keeps open never does


@contextmanager
def connect_duckdb(
    path: Path | str, read_only: bool = False, timeout_s: float | None = None, advice: str = ""
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection to a DuckDB file, waiting while another process holds a conflicting lock.

    Lock conflicts are retried with jittered exponential backoff (5 ms up to 250 ms) for up to
    ``timeout_s`` (default ``LOCK_TIMEOUT_S``), then ``DuckDBLockTimeout`` names the file and the
    holder's PID. A file DuckDB cannot open (not a database, truncated, a bad checksum) raises
    ``DuckDBFileError`` naming it, followed by ``advice`` (what to do about that file). The
    connection is closed on exit.
    """
    started = time.monotonic()
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    wait = _FIRST_WAIT_S
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as error:
            text, waited = str(error), time.monotonic() - started
            if _OTHER_PROCESS not in text and _OTHER_THREAD not in text:
                reason = " ".join(text.split())[:200]
                raise DuckDBFileError(
                    f"{path} cannot be opened as a DuckDB database ({reason})" + (f"; {advice}" if advice else "")
                ) from None
            limit = min(timeout_s, _OTHER_THREAD_WAIT_S) if _OTHER_THREAD in text else timeout_s
            if waited >= limit:
                raise DuckDBLockTimeout(
                    f"{path} stayed locked for {waited:.0f}s (a `duckdb` shell open on it? open it with "
                    f"-readonly): {text}"
                ) from error
        time.sleep(max(0.0, min(wait * random.uniform(0.5, 1.5), timeout_s - (time.monotonic() - started))))
        wait = min(wait * 2, _MAX_WAIT_S)
    try:
        yield con
    finally:
        con.close()


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        with atomic_path(target) as staging:
            pq.write_table(arrow, staging)
        self.refresh_view(table)
        return target

    def read(self, table: str, partition: str) -> pd.DataFrame:
        path = self.path(table, partition)
        try:
            # One handle for the footer and the data, so a concurrent rewrite cannot mix two files.
            with pa.OSFile(str(path), "rb") as file:
                return pq.read_table(file).to_pandas()
        except FileNotFoundError:
            raise FileNotFoundError(f"lake table {table!r} has no partition {partition!r} (expected {path})") from None
        except (pa.ArrowException, OSError) as error:
            raise unreadable(path, error) from error

    def partitions(self, table: str) -> list[str]:
        folder = self.root / table
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def scan(self, table: str, except_partition: str | None = None) -> str | None:
        """SQL reading every partition of a table (or all but one), or None if there is none."""
        files = [self.path(table, p) for p in self.partitions(table) if p != except_partition]
        if not files:
            return None
        listed = ", ".join(_sql_string(f.as_posix()) for f in files)
        return f"read_parquet([{listed}], union_by_name = true)"

    def sql(self, query: str, params: dict | None = None) -> pd.DataFrame:
        """Run SQL over ``scan()`` expressions in an in-memory DuckDB (no catalog lock taken)."""

        def run() -> pd.DataFrame:
            with duckdb.connect() as con:
                return con.execute(query, params).df() if params else con.execute(query).df()

        return self._read_consistently(query, run)

    def refresh_view(self, table: str) -> None:
        """Make sure the catalog has the view over the table's Parquet glob (a no-op when it has)."""
        source = self._view_source(table)
        if self._view_comment(table) == source:
            return  # the view already reads every partition, new ones included: no write lock needed

        def create(con: duckdb.DuckDBPyConnection) -> None:
            # The comment records what the view reads, so later writes can see it is current.
            con.execute("BEGIN TRANSACTION")
            con.execute(f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM {source}')
            con.execute(f'COMMENT ON VIEW "{table}" IS {_sql_string(source)}')
            con.execute("COMMIT")
            # Into the catalog file itself before the lock is released: the view then depends neither on this
            # process closing cleanly nor on the next opener replaying a write-ahead log.
            con.execute("CHECKPOINT")

        # Creating the view reads every partition's schema, so it too must not race a rewrite.
        self._read_consistently(f'"{table}"', lambda: self._with_catalog(create))

    def view_is_current(self, table: str) -> bool:
        """Whether the catalog has the view that reads every partition of the table."""
        return self._view_comment(table) == self._view_source(table)

    def _view_source(self, table: str) -> str:
        return f"read_parquet({_sql_string((self.root / table / '*.parquet').as_posix())}, union_by_name = true)"

    def _view_comment(self, table: str) -> str | None:
        if not self.catalog_path.exists():
            return None
        sql = "SELECT comment FROM duckdb_views() WHERE view_name = ? AND NOT internal"
        row = self._with_catalog(lambda con: con.execute(sql, [table]).fetchone(), read_only=True)
        return row[0] if row else None

    def query(self, sql: str) -> pd.DataFrame:
        """Run read-only SQL against the catalog views."""
        return self._read_consistently(
            sql, lambda: self._with_catalog(lambda con: con.execute(sql).df(), read_only=True)
        )

    def _read_consistently(self, sql: str, run):
        """``run()``, again while a partition of a table the SQL names changed during the attempt."""
        tables = self._tables_named_in(sql)
        deadline = time.monotonic() + READ_RETRY_TIMEOUT_S
        wait = _FIRST_WAIT_S
        while True:
            before = self._file_identities(tables)
            try:
                result, error = run(), None
            except duckdb.Error as failure:  # e.g. "Out of buffer" when a file changed under the reader
                result, error = None, failure
            after = self._file_identities(tables)
            # Replaced or removed, or new: a file that appeared mid-query may also have been replaced mid-query.
            changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
            if not changed:
                if error is not None:
                    raise self._named(tables, error)
                return result
            if time.monotonic() >= deadline:
                raise LakeReadConflict(
                    f"lake partitions kept being rewritten while a query read them, for {READ_RETRY_TIMEOUT_S:.0f}s: "
                    + ", ".join(changed[:5])
                ) from error
            time.sleep(wait * random.uniform(0.5, 1.5))
            wait = min(wait * 2, _MAX_WAIT_S)

    def unreadable_files(self, folders: list[Path] | None = None) -> list[tuple[Path, str]]:
        """Every partition file (of the given table folders, or of the whole lake) whose footer cannot be read."""
        if folders is None:
            folders = [path for path in self.root.iterdir() if path.is_dir()] if self.root.is_dir() else []
        found = []
        for folder in folders:
            for path in sorted(folder.glob("*.parquet")):
                try:
                    pq.read_metadata(path)
                except (pa.ArrowException, OSError) as error:
                    found.append((path, " ".join(str(error).split())[:200]))
        return found

    def _named(self, tables: list[Path], error: duckdb.Error) -> Exception:
        """A query's error, naming the lake file behind it when one of its files is unreadable."""
        broken = self.unreadable_files(tables)
        if not broken:
            return error
        path, reason = broken[0]
        return unreadable(path, RuntimeError(reason))

    def _tables_named_in(self, sql: str) -> list[Path]:
        """Table folders whose name (a view) or path (a scan) appears in the SQL; more is only slower."""
        try:
            folders = [entry for entry in os.scandir(self.root) if entry.is_dir()]
        except OSError:
            return []
        return [
            Path(entry.path)
            for entry in folders
            if re.search(rf"(?<![\w]){re.escape(entry.name)}(?![\w])", sql, flags=re.IGNORECASE)
        ]

    @staticmethod
    def _file_identities(folders: list[Path]) -> dict[str, tuple[int, int, int, int]]:
        identities = {}
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".parquet"):
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue  # replaced or removed this instant: absent, so a change if it was there before
                    identities[entry.path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        return identities

    def _with_catalog(self, work, read_only: bool = False):
        # Another process (a concurrent run, a user's SQL shell) may hold the file lock briefly.
        self.root.mkdir(parents=True, exist_ok=True)
        if read_only and not self.catalog_path.exists():
            with connect_duckdb(self.catalog_path, advice=CATALOG_ADVICE):
                pass  # an empty catalog, so a read-only connection can open it
        with connect_duckdb(self.catalog_path, read_only=read_only, advice=CATALOG_ADVICE) as con:
            return work(con)

"""A real PostgreSQL server for the tests: initdb into a temporary folder, a unix socket only, stopped at the end.

Debian's ``postgresql`` package provides the binaries (`make postgres` installs it when missing). As root, the
server runs as the ``postgres`` user the package creates (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DATABASE = "tao"


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on the PATH, or Debian's versioned folder."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a throwaway server; yield its URL (postgresql://...?host=SOCKET_DIR)."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed: `make postgres` (Debian's postgresql package)")
    folder = Path(tempfile.mkdtemp(prefix="tao-postgres-"))
    user = "postgres" if os.geteuid() == 0 else None
    as_user = ["runuser", "-u", user, "--"] if user else []
    if user:
        shutil.chown(folder, user)
    data, log = folder / "data", folder / "server.log"
    run = lambda *command: subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-c listen_addresses='' -k {folder} -c fsync=off -c max_connections=200"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        run(str(binaries / "createdb"), "-h", str(folder), "-U", "postgres", DATABASE)
        yield f"postgresql://postgres@/{DATABASE}?host={folder}"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)

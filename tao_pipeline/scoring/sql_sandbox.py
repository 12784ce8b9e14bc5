"""Model-written SQL runs in a child process whose limits the operating system enforces.

DuckDB's own ``memory_limit`` governs its buffer manager only, and an interrupt is honoured only
where DuckDB checks for one: a query that builds a huge list or string, or runs a regular
expression over millions of rows, can take gigabytes and run far past its time limit. So each
verifier keeps one worker process (``python -m tao_pipeline.scoring.sql_sandbox``) with a hard
cap on its data segment (RLIMIT_DATA, which covers the heap and anonymous mappings) and on its
CPU seconds, one DuckDB thread, and a parent that kills it at the wall-clock deadline. A killed
or crashed worker costs only its query: the next query starts a fresh one.

Protocol: one JSON request per line on stdin ({"sql", "max_rows"}), one JSON answer per line
on stdout ({"ran", "rows", "ordered", "reason"}); rows are already normalised for comparison.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from tao_pipeline.scoring.sql_query import execute_in_sandbox

WORKER_MODULE = "tao_pipeline.scoring.sql_sandbox"
READY = b'{"ready": true}\n'
STARTUP_TIMEOUT_S = 60.0
# What the worker's Python, DuckDB and its own bookkeeping take beside the query's memory.
RUNTIME_ALLOWANCE_BYTES = 512 * 2**20
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'1GB' -> 1e9 bytes, '512MiB' -> 512 * 2**20 (DuckDB's units)."""
    number = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if number.endswith(u)), None)
    if unit is None or not number[: -len(unit)].replace(".", "", 1).isdigit():
        raise ValueError(f"{text!r} is not a size like '1GB' or '512MiB'")
    return int(float(number[: -len(unit)]) * _UNITS[unit])


class SandboxProcess:
    """One worker process for one database; restarted after a query kills it."""

    def __init__(self, database: Path, config: dict[str, Any], memory_limit_bytes: int, kill_after_s: float):
        self.database, self.config = database, config
        self.data_limit = memory_limit_bytes + RUNTIME_ALLOWANCE_BYTES
        self.kill_after_s = kill_after_s
        self._process: subprocess.Popen | None = None

    def run(self, sql: str, max_rows: int, timeout_s: float) -> dict[str, Any]:
        """The worker's answer for one query; a query still running ``kill_after_s`` after it was sent, or
        past its memory, is killed with its process."""
        process = self._worker()
        deadline = time.monotonic() + self.kill_after_s
        request = {"sql": sql, "max_rows": max_rows, "timeout_s": timeout_s}
        try:
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            return self._died(process)
        line = _read_line(process, deadline)
        if line is None:
            self.close()
            return {"ran": False, "reason": f"timed out after {timeout_s} s (killed: it did not stop when asked)"}
        if not line:
            return self._died(process)
        return json.loads(line)

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _worker(self) -> subprocess.Popen:
        """The running worker, or a new one once it says it is ready (its start counts against no query)."""
        if self._process is not None and self._process.poll() is None:
            return self._process
        limits = (self.data_limit, int(self.kill_after_s) + 2)
        process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, str(self.database), json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _limit_self(*limits),
        )  # fmt: skip
        weakref.finalize(self, process.kill)  # a verifier that is gone leaves no worker behind
        if _read_line(process, time.monotonic() + STARTUP_TIMEOUT_S) != READY:
            process.kill()
            raise RuntimeError("the SQL sandbox process did not start")
        self._process = process
        return process

    def _died(self, process: subprocess.Popen) -> dict[str, Any]:
        process.wait()
        self._process = None
        cause = f"signal {-process.returncode}" if process.returncode < 0 else f"exit {process.returncode}"
        return {"ran": False, "reason": f"the query's process died ({cause}): over its memory or CPU limit"}


def _limit_self(data_bytes: int, cpu_seconds: int) -> None:
    """In the worker, before exec: caps the kernel enforces whatever the query does."""
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read_line(process: subprocess.Popen, deadline: float) -> bytes | None:
    """One line from the worker by the deadline (b"" if it died first), or None when the deadline passed."""
    fd, buffer = process.stdout.fileno(), b""
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b""
        buffer += chunk
    return buffer


# -- the worker ----------------------------------------------------------------------------------


def serve(database: str, config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.write(READY.decode())
    sys.stdout.flush()
    for line in sys.stdin.buffer:  # ends when the parent closes the pipe, or dies
        request = json.loads(line)
        try:
            answer = execute_in_sandbox(database, config, request["sql"], request["max_rows"], request["timeout_s"])
        except MemoryError:
            answer = {"ran": False, "reason": "ran out of its memory limit"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))

"""Model-written SQL runs in a child process whose limits the operating system enforces.

DuckDB's own ``memory_limit`` governs its buffer manager only, and an interrupt is honoured only
where DuckDB checks for one: a query that builds a huge list or string, or runs a regular
expression over millions of rows, can take gigabytes and run far past its time limit. So each
verifier keeps one worker process (``python -m tao_pipeline.scoring.sql_sandbox``) with a hard
cap on its data segment (RLIMIT_DATA, which covers the heap and anonymous mappings), one DuckDB
thread, and a parent that kills it at a wall-clock deadline. A killed or crashed worker costs
only its query: the next query starts a fresh one.

Each query's time limit is its own. Its budget is CPU time, counted from what the worker had
used when the query started: the worker interrupts DuckDB once the query has used it, and
before each query it sets its CPU rlimit (RLIMIT_CPU, soft) to what it has used so far plus that
budget and a grace, so the kernel stops a query that ignores the interrupt, and nothing that
earlier queries used counts against a later one. Wall-clock time (a busy machine, a slow disk)
is bounded too, but a query stopped by it has not been shown to be too slow.

Protocol: one JSON request per line on stdin ({"sql", "max_rows", "cpu_s", "wall_s"}), one JSON
answer per line on stdout ({"ran", "rows", "ordered", "reason", "limit"} plus "cpu_total_s", the
worker's CPU time after the query); rows are already normalised for comparison. The worker's
first line is {"ready": true, "cpu_total_s": ...}.
"""

from __future__ import annotations

import json
import math
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
STARTUP_TIMEOUT_S = 60.0
# What the worker's Python, DuckDB and its own bookkeeping take beside the query's memory.
RUNTIME_ALLOWANCE_BYTES = 512 * 2**20
# CPU seconds past a query's budget before the kernel stops it (the worker's interrupt comes first).
CPU_RLIMIT_GRACE_S = 1
# Wall-clock seconds past the worker's own wall-clock interrupt before the parent kills it.
KILL_GRACE_S = 1.0
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
    """One worker process for one database; restarted after a query kills it.

    Every answer says whether this query was the worker's first (``fresh``): a limit hit in a
    fresh worker owes nothing to earlier queries.
    """

    def __init__(self, database: Path, config: dict[str, Any], memory_limit_bytes: int):
        self.database, self.config = database, config
        self.data_limit = memory_limit_bytes + RUNTIME_ALLOWANCE_BYTES
        self._process: subprocess.Popen | None = None
        self._queries = 0  # answered by the running worker
        self._cpu_total_s = 0.0  # the running worker's CPU time when it last answered

    def run(self, sql: str, max_rows: int, cpu_s: float, wall_s: float) -> dict[str, Any]:
        """The worker's answer for one query, with ``fresh``. A query still running ``KILL_GRACE_S`` after its
        wall-clock limit is killed with its process; so is one past its memory or its CPU rlimit."""
        process = self._worker()
        fresh = self._queries == 0
        self._queries += 1
        request = {"sql": sql, "max_rows": max_rows, "cpu_s": cpu_s, "wall_s": wall_s}
        try:
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            return self._died(process) | {"fresh": fresh}
        line = _read_line(process, time.monotonic() + wall_s + KILL_GRACE_S)
        if line is None:
            used = self._cpu_used(process)
            self.close()
            limit = "cpu" if used >= cpu_s else "wall"
            reason = f"timed out after {wall_s:g} s (killed: it did not stop when asked; {used:.1f} s of CPU)"
            return {"ran": False, "limit": limit, "reason": reason, "fresh": fresh}
        if not line:
            return self._died(process) | {"fresh": fresh}
        answer = json.loads(line)
        self._cpu_total_s = answer.pop("cpu_total_s", self._cpu_total_s)
        return answer | {"fresh": fresh}

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _worker(self) -> subprocess.Popen:
        """The running worker, or a new one once it says it is ready (its start counts against no query)."""
        if self._process is not None and self._process.poll() is None:
            return self._process
        data_limit = self.data_limit
        process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, str(self.database), json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _limit_self(data_limit),
        )  # fmt: skip
        weakref.finalize(self, process.kill)  # a verifier that is gone leaves no worker behind
        line = _read_line(process, time.monotonic() + STARTUP_TIMEOUT_S)
        ready = _json_or_none(line)
        if not isinstance(ready, dict) or ready.get("ready") is not True:
            process.kill()
            process.wait()
            raise RuntimeError("the SQL sandbox process did not start")
        self._process, self._queries, self._cpu_total_s = process, 0, float(ready.get("cpu_total_s", 0.0))
        return process

    def _cpu_used(self, process: subprocess.Popen) -> float:
        """CPU seconds the running query has used (the worker's total less what it had used before)."""
        import psutil

        try:
            times = psutil.Process(process.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return max(0.0, times.user + times.system - self._cpu_total_s)

    def _died(self, process: subprocess.Popen) -> dict[str, Any]:
        process.wait()
        self._process = None
        code = process.returncode
        if code == -signal.SIGXCPU:  # the kernel's CPU rlimit: the query used its budget and the grace
            return {"ran": False, "limit": "cpu", "reason": "timed out: killed past its CPU time limit"}
        if code == -signal.SIGKILL:  # not ours (we kill only after a deadline): the machine's OOM killer, a user
            return {"ran": False, "limit": "external", "reason": "the query's process was killed from outside"}
        cause = f"signal {-code}" if code < 0 else f"exit {code}"
        return {"ran": False, "limit": "memory", "reason": f"the query's process died ({cause}): over its memory limit"}


def _limit_self(data_bytes: int) -> None:
    """In the worker, before exec: caps the kernel enforces whatever the query does."""
    resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _limit_cpu(STARTUP_TIMEOUT_S)


def _limit_cpu(seconds: float) -> None:
    """The kernel stops this process (SIGXCPU) once it has used ``seconds`` more CPU than it has so far."""
    soft = math.ceil(time.process_time() + seconds)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _json_or_none(line: bytes | None) -> Any:
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None


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
    _answer({"ready": True})
    for line in sys.stdin.buffer:  # ends when the parent closes the pipe, or dies
        request = json.loads(line)
        _limit_cpu(request["cpu_s"] + CPU_RLIMIT_GRACE_S)  # this query's budget, whatever earlier ones used
        try:
            answer = execute_in_sandbox(
                database, config, request["sql"], request["max_rows"], request["cpu_s"], request["wall_s"]
            )
        except MemoryError:
            answer = {"ran": False, "limit": "memory", "reason": "ran out of its memory limit"}
        _answer(answer)


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer | {"cpu_total_s": time.process_time()}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))

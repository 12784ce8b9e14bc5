"""Every answered request, written into the flywheel's inbox so that the next round learns from it.

Rows are appended to a hidden file ``.serve-<pid>-<n>.jsonl.partial`` inside the inbox, which the
inbox contract never reads, and the file is renamed to ``serve-<time>-<pid>-<n>.jsonl`` once it
holds ``roll_rows`` rows or is ``roll_seconds`` old (and when the server stops). A rename within
one folder is atomic, so ingestion sees a log file whole or not at all. A server killed mid-file
leaves its ``.partial`` behind; the next server to start on the inbox renames it, without a last
line that was cut short.

A row is what ingestion reads (``id``, ``prompt``, ``system``, ``task``) plus what the server knows
(``model_version``, ``response``, ``latency_ms``, tokens, ``received_at``); ingestion keeps the
first and ignores the rest, which stays in the archived file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".jsonl.partial"


class RequestLog:
    def __init__(
        self,
        inbox: Path,
        *,
        roll_rows: int = 1000,
        roll_seconds: float = 60.0,
        log_responses: bool = True,
        drop_fields: tuple[str, ...] = (),
    ):
        self.inbox = Path(inbox)
        self.roll_rows, self.roll_seconds = roll_rows, roll_seconds
        self.log_responses, self.drop_fields = log_responses, set(drop_fields)
        self.rows_written = 0
        self._lock = threading.Lock()
        self._file = None
        self._path: Path | None = None
        self._rows_in_file, self._opened_at, self._sequence = 0, 0.0, 0
        self._stop = threading.Event()
        self._roller = threading.Thread(target=self._roll_when_old, name="tao-serve-log", daemon=True)

    def start(self) -> list[Path]:
        """Create the inbox, recover files left by a server that died, and start rolling by age."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        recovered = recover_partial_files(self.inbox)
        self._roller.start()
        return recovered

    def write(self, row: dict[str, Any]) -> None:
        row = {key: value for key, value in row.items() if key not in self.drop_fields}
        if not self.log_responses:
            row.pop("response", None)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self._open()
            self._file.write(line)
            self._file.flush()
            self._rows_in_file += 1
            self.rows_written += 1
            if self._rows_in_file >= self.roll_rows:
                self._roll()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._roll()

    def flush(self) -> None:
        """Hand the rows so far to the inbox now (a test or an operator's `tao serve` shutdown)."""
        with self._lock:
            self._roll()

    def _open(self) -> None:
        self._sequence += 1
        self._path = self.inbox / f".serve-{os.getpid()}-{self._sequence}{PARTIAL_SUFFIX}"
        self._file = self._path.open("a", encoding="utf-8")
        self._rows_in_file, self._opened_at = 0, time.monotonic()

    def _roll(self) -> None:
        if self._file is None:
            return
        self._file.close()
        if self._rows_in_file:
            os.replace(self._path, self.inbox / _final_name(self._path))
        else:
            self._path.unlink(missing_ok=True)
        self._file = self._path = None

    def _roll_when_old(self) -> None:
        while not self._stop.wait(min(1.0, self.roll_seconds / 4)):
            with self._lock:
                if self._file is not None and time.monotonic() - self._opened_at >= self.roll_seconds:
                    self._roll()


def _final_name(partial: Path) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"serve-{stamp}-{partial.name[len('.serve-') : -len(PARTIAL_SUFFIX)]}.jsonl"


def recover_partial_files(inbox: Path) -> list[Path]:
    """Rename the ``.partial`` files of servers that are no longer running, cut at their last whole line."""
    recovered = []
    for partial in sorted(inbox.glob(f".serve-*{PARTIAL_SUFFIX}")):
        pid = partial.name[len(".serve-") :].split("-")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        data = partial.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if whole:
            target = inbox / _final_name(partial)
            if len(whole) < len(data):
                partial.write_bytes(whole)  # the line the server was writing when it died
            os.replace(partial, target)
            recovered.append(target)
            logger.warning("tao serve: recovered %d rows a stopped server left in %s", whole.count(b"\n"), target.name)
        else:
            partial.unlink()
    return recovered


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

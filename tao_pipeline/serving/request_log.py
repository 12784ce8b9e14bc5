"""Every answered request, written into the flywheel's inbox so that the next round learns from it.

Rows are appended to a hidden file ``.serve-<instance>-<n>.jsonl.partial`` inside the inbox, which
the inbox contract never reads, and the file is renamed to ``serve-<time>-<instance>-<n>.jsonl``
once it holds ``roll_rows`` rows or is ``roll_seconds`` old (and when the server stops). A rename
within one folder is atomic, so ingestion sees a log file whole or not at all.

Several servers may share one inbox (replicas on a shared volume, a rolling update): the instance
in every name is the host, the pid and a random id, so two containers that are both pid 1 never
write or rename each other's files. A server holds an exclusive ``flock`` on its open file; a
``.partial`` nobody holds belongs to a server that died, and the next server to start on the inbox
renames it, without a last line that was cut short.

Logging never fails a request: a write or a rename that fails (a full disk, a file moved away) is
counted, shown by ``/health`` and ``/metrics``, and the file is handed over later or its rows are
copied into a new file; only the row being written when the disk is full is lost, and counted.

Every path used here is an entry of the inbox opened through a handle on the inbox folder, never
following a link: a ``.partial`` that is a link, a hard link, a folder or a FIFO is left alone.

A row is an OpenAI request/response pair, the shape apps already log, plus what the server knows.
An answer gives one row per choice (``n`` choices, ``n`` rows; a completions request with a list of
prompts, one per prompt and choice)::

    {"id": "chatcmpl-<hex>",            # the completion's id, as the client got it (body and stream)
     "request": {...},                  # the request as sent, validated: model, messages (the whole
                                        # conversation) or prompt (this row's own), metadata, sampling
     "response": {"id", "object", "created", "model", "usage",
                  "choices": [<this row's choice, with its index>]},  # as returned to the client
     "task": ..., "model_version": ..., "latency_ms": ..., "endpoint": "chat"|"completions",
     "received_at": <ISO time>}

A ``POST /v1/feedback`` gives a row of its own, joined to its answer by ingestion::

    {"id": "feedback-<hex>",
     "feedback": {"response_id", "choice", "rating" (-1..1 or null), "comment", "correction"},
     "received_at": <ISO time>}

``serve.log_responses = false`` (or ``"response"`` in ``serve.drop_fields``) keeps an answer's text
out (its choice keeps index, role and finish_reason; the response its id, model and usage);
``serve.drop_fields`` leaves out ``"system"`` (the system and developer messages of the request),
any other field of the request (``"metadata"``, ``"user"``) and any field of the row itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".serve-"
PARTIAL_SUFFIX = ".jsonl.partial"
_LEGACY_NAME = re.compile(r"\.serve-(\d+)-\d+\.jsonl\.partial")  # before instance ids: the pid alone
_OPEN_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FOUND = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


def new_instance_id() -> str:
    """This server among the replicas writing into one inbox: host, pid and a random part."""
    host = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())[:40].strip("._") or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class LogHealth:
    """What went wrong with the log since the server started (all zero when all is well)."""

    rows_written: int = 0
    files_handed_over: int = 0
    write_errors: int = 0
    roll_errors: int = 0
    rows_lost: int = 0
    files_recovered: int = 0
    entries_skipped: int = 0  # foreign .partial entries left alone (links, folders, FIFOs, hard links)
    last_error: str | None = None
    waiting_files: list[str] = field(default_factory=list)  # written, not yet handed over after an error
    last_write_failed: bool = False

    @property
    def ok(self) -> bool:
        """Nothing waiting and the last write worked (the counters keep what happened before)."""
        return not self.waiting_files and not self.last_write_failed

    def as_dict(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "degraded", **self.__dict__, "waiting_files": list(self.waiting_files)}


@dataclass
class _OpenFile:
    name: str
    fd: int
    rows: int = 0
    size: int = 0
    opened_at: float = field(default_factory=time.monotonic)


class RequestLog:
    def __init__(
        self,
        inbox: Path,
        *,
        roll_rows: int = 1000,
        roll_seconds: float = 60.0,
        log_responses: bool = True,
        drop_fields: tuple[str, ...] = (),
        instance: str | None = None,
    ):
        self.inbox = Path(inbox)
        self.roll_rows, self.roll_seconds = roll_rows, roll_seconds
        self.log_responses, self.drop_fields = log_responses, set(drop_fields)
        self.instance = instance or new_instance_id()
        self.health = LogHealth()
        self._lock = threading.Lock()
        self._dir: int | None = None  # a handle on the inbox folder: every name below is inside it
        self._file: _OpenFile | None = None
        self._waiting: list[_OpenFile] = []  # closed for writing, their rename failed: tried again
        self._sequence = 0
        self._stop = threading.Event()
        self._roller = threading.Thread(target=self._roll_when_old, name="tao-serve-log", daemon=True)

    @property
    def rows_written(self) -> int:
        return self.health.rows_written

    def start(self) -> list[Path]:
        """Open the inbox, recover files left by servers that died, and start rolling by age."""
        self._dir = open_inbox(self.inbox)
        recovered, skipped = recover_partial_files(self.inbox)
        self.health.files_recovered, self.health.entries_skipped = len(recovered), len(skipped)
        self._roller.start()
        return recovered

    def write(self, row: dict[str, Any]) -> bool:
        """Append one row; False when it could not be logged (counted and shown, never raised)."""
        row = redacted(row, self.drop_fields, self.log_responses)
        try:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as error:  # not JSON, or text that is not Unicode
            with self._lock:
                self._lost(1, f"a row could not be written as JSON: {error}")
            return False
        with self._lock:
            try:
                if self._file is None:
                    self._file = self._open()
                _append(self._file, line)
            except OSError as error:
                self.health.write_errors += 1
                self.health.last_write_failed = True
                self._lost(1, f"writing to the inbox failed: {_describe(error)}")
                self._close_for_writing()
                return False
            self.health.last_write_failed = False
            self._file.rows += 1
            self.health.rows_written += 1
            if self._file.rows >= self.roll_rows:
                self._close_for_writing()
            return True

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._close_for_writing()
            self._retry_waiting()
            for waiting in self._waiting:  # still not handed over: the next server recovers them
                os.close(waiting.fd)
            self._waiting.clear()
            if self._dir is not None:
                os.close(self._dir)
                self._dir = None

    def flush(self) -> None:
        """Hand the rows so far to the inbox now (a test or an operator's `tao serve` shutdown)."""
        with self._lock:
            self._close_for_writing()
            self._retry_waiting()

    # -- files -------------------------------------------------------------------------------------

    def _open(self) -> _OpenFile:
        self._sequence += 1
        name = f"{PARTIAL_PREFIX}{self.instance}-{self._sequence}{PARTIAL_SUFFIX}"
        fd = os.open(name, _OPEN_NEW, 0o644, dir_fd=self._inbox_handle())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the file is ours: not a dead server's
        except OSError:
            os.close(fd)
            raise
        return _OpenFile(name, fd)

    def _close_for_writing(self) -> None:
        """Hand the open file to the inbox (or delete it when empty); on failure keep it to try again."""
        current, self._file = self._file, None
        if current is None:
            return
        if current.rows == 0:
            with contextlib.suppress(OSError):
                os.unlink(current.name, dir_fd=self._dir)
            os.close(current.fd)
            return
        self._waiting.append(current)
        self._retry_waiting()

    def _retry_waiting(self) -> None:
        for waiting in list(self._waiting):
            try:
                self._hand_over(waiting)
            except OSError as error:
                self.health.roll_errors += 1
                self._note(f"handing {waiting.name} to the inbox failed (tried again): {_describe(error)}")
                continue
            self._waiting.remove(waiting)
            os.close(waiting.fd)  # releases the lock only once the rows are under their final name
            self.health.files_handed_over += 1
        self.health.waiting_files = [waiting.name for waiting in self._waiting]

    def _hand_over(self, log: _OpenFile) -> None:
        directory = self._inbox_handle()
        final = final_name(log.name)
        if _same_file(directory, log.name, log.fd):
            os.rename(log.name, final, src_dir_fd=directory, dst_dir_fd=directory)
            return
        if os.fstat(log.fd).st_nlink > 0:  # moved away under another name by someone else: it is theirs now
            self._lost(0, f"{log.name} was moved away by another process; its {log.rows} rows are wherever it went")
            return
        # Deleted (or the inbox was replaced): the rows are still in our open file; copy them back.
        copy = self._open()
        try:
            _copy_rows(log.fd, copy.fd, log.size)
            os.rename(copy.name, final_name(copy.name), src_dir_fd=directory, dst_dir_fd=directory)
        finally:
            os.close(copy.fd)
        logger.warning("tao serve: %s had been deleted; its %d rows were written again", log.name, log.rows)

    def _inbox_handle(self) -> int:
        """The inbox folder's handle, reopened if the folder was removed or replaced since."""
        if self._dir is None or not _same_folder(self.inbox, self._dir):
            old, self._dir = self._dir, open_inbox(self.inbox)
            if old is not None:
                os.close(old)
        return self._dir

    def _roll_when_old(self) -> None:
        while not self._stop.wait(min(1.0, self.roll_seconds / 4)):
            try:
                with self._lock:
                    if self._file is not None and time.monotonic() - self._file.opened_at >= self.roll_seconds:
                        self._close_for_writing()
                    elif self._waiting:
                        self._retry_waiting()
            except Exception as error:  # noqa: BLE001 - the roller must outlive any fault, or files stop rolling
                self._note(f"the log roller hit {_describe(error)}")
                logger.exception("tao serve: the request log's roller")

    def _lost(self, rows: int, message: str) -> None:
        self.health.rows_lost += rows
        self._note(message)

    def _note(self, message: str) -> None:
        if message != self.health.last_error:
            logger.error("tao serve: request log: %s", message)
        self.health.last_error = message


SYSTEM_ROLES = frozenset({"system", "developer"})
_ANSWER_TEXT = ("text", "logprobs")  # a completions choice's text (and its tokens)
_MESSAGE_TEXT = ("content", "refusal")  # a chat choice's


def redacted(row: dict[str, Any], drop_fields: set[str] | frozenset[str], log_responses: bool = True) -> dict[str, Any]:
    """The row as it may be kept: without ``drop_fields`` (of the row, of its request, ``"system"`` for the
    system messages) and, unless ``log_responses``, without the answer's text (ids, model and usage stay)."""
    row = {key: value for key, value in row.items() if key == "response" or key not in drop_fields}
    request = row.get("request")
    if isinstance(request, dict) and drop_fields:
        request = {key: value for key, value in request.items() if key not in drop_fields}
        if "system" in drop_fields and isinstance(request.get("messages"), list):
            request["messages"] = [
                message
                for message in request["messages"]
                if not (isinstance(message, dict) and message.get("role") in SYSTEM_ROLES)
            ]
        row["request"] = request
    if "response" in row and (not log_responses or "response" in drop_fields):
        row["response"] = _without_text(row["response"])
    return row


def _without_text(response: Any) -> Any:
    if not isinstance(response, dict):
        return None  # text of some other shape: nothing of it is kept
    choices = []
    for choice in response.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        kept = {key: value for key, value in choice.items() if key not in _ANSWER_TEXT}
        if isinstance(message := kept.get("message"), dict):
            kept["message"] = {key: value for key, value in message.items() if key not in _MESSAGE_TEXT}
        choices.append(kept)
    return {**response, "choices": choices}


def open_inbox(inbox: Path) -> int:
    """A handle on the inbox folder (created if missing); refused when its last part is a link or not a folder."""
    inbox.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(error.errno, f"the inbox {inbox} is a link or not a folder; use a real folder") from None
        raise


def final_name(partial: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"serve-{stamp}-{partial[len(PARTIAL_PREFIX) : -len(PARTIAL_SUFFIX)]}.jsonl"


def recover_partial_files(inbox: Path) -> tuple[list[Path], list[str]]:
    """Hand over the ``.partial`` files of servers that are no longer running, cut at their last whole line.

    Returns the files recovered and the entries left alone, each with why. An entry is recovered only
    if it is a regular file with one link (opened without following a link or blocking on a FIFO)
    that no running server holds."""
    recovered: list[Path] = []
    skipped: list[str] = []
    directory = open_inbox(inbox)
    try:
        for name in sorted(os.listdir(directory)):
            if not (name.startswith(PARTIAL_PREFIX) and name.endswith(PARTIAL_SUFFIX)):
                continue
            try:
                outcome = _recover_one(directory, name)
            except OSError as error:
                outcome = f"cannot be recovered: {_describe(error)}"
            if outcome is None:
                continue
            if outcome.startswith("serve-"):
                recovered.append(inbox / outcome)
            else:
                skipped.append(f"{name}: {outcome}")
                logger.warning("tao serve: left %s in the inbox alone: it is %s", name, outcome)
    finally:
        os.close(directory)
    return recovered, skipped


def _recover_one(directory: int, name: str) -> str | None:
    """The final name it was handed over as, None if a running server owns it (or it was empty), else why not."""
    problem = _entry_problem(os.stat(name, dir_fd=directory, follow_symlinks=False))
    if problem:
        return problem
    legacy = _LEGACY_NAME.fullmatch(name)
    if legacy and _running(int(legacy.group(1))):
        return None
    try:
        fd = os.open(name, _OPEN_FOUND, dir_fd=directory)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link"
        raise
    try:
        problem = _entry_problem(os.fstat(fd))
        if problem:
            return problem
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a running server's file
        whole = _whole_lines_length(fd)
        if whole == 0:
            if _same_file(directory, name, fd):
                os.unlink(name, dir_fd=directory)
            return None
        os.ftruncate(fd, whole)  # the line the server was writing when it died
        target = final_name(name)
        if not _same_file(directory, name, fd):
            return "replaced while it was being recovered"
        os.rename(name, target, src_dir_fd=directory, dst_dir_fd=directory)
        logger.warning("tao serve: recovered the rows a stopped server left in %s", target)
        return target
    finally:
        os.close(fd)


def _entry_problem(info: os.stat_result) -> str | None:
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a folder"
    if stat.S_ISFIFO(info.st_mode):
        return "a FIFO"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink != 1:
        return f"a hard link ({info.st_nlink} names for one file)"
    return None


def _whole_lines_length(fd: int, block: int = 1 << 16) -> int:
    """Bytes up to and including the last newline, found from the end without reading the whole file."""
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - block)
        data = os.pread(fd, end - start, start)
        newline = data.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _append(log: _OpenFile, data: bytes) -> None:
    """All of ``data`` or nothing: a write cut short (a full disk) is taken back, so no half line stays."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(log.fd, view) :]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(log.fd, log.size)
        raise
    log.size += len(data)


def _copy_rows(source: int, target: int, size: int, block: int = 1 << 20) -> None:
    offset = 0
    while offset < size:
        data = os.pread(source, min(block, size - offset), offset)
        if not data:
            break
        os.write(target, data)
        offset += len(data)


def _same_file(directory: int, name: str, fd: int) -> bool:
    try:
        entry = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (entry.st_dev, entry.st_ino) == (opened.st_dev, opened.st_ino)


def _same_folder(path: Path, fd: int) -> bool:
    try:
        entry = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return stat.S_ISDIR(entry.st_mode) and (entry.st_dev, entry.st_ino) == (opened.st_dev, opened.st_ino)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}" + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {error}"


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

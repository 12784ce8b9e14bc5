"""The inbox: which log files are ready, which are new, and where a handled file goes.

The contract an app follows (README, "The inbox contract"):

- Only regular files directly inside the inbox are read, each with one link. Symbolic links,
  hard links (a second name for a file elsewhere), devices, FIFOs, sockets and names that are not
  valid UTF-8 are refused (never opened), so nothing outside the inbox can be pulled in. Files are
  opened without following links and checked again once open.
- A file is read only once it has not changed for ``flywheel.settle_seconds``: an app may append
  to a file, and it is read after the app has paused that long. Names ending in ``.tmp``,
  ``.partial`` or ``.part`` (and hidden names) are never read: an app that pauses longer writes
  under such a name and renames the file when it is complete.
- A file is identified by the hash of its content. It counts as ingested once its usage_logs
  partition is in the lake (its kept and quarantined rows are committed together, the usage rows
  last); until then it is retried, and once ingested it is moved to ``inbox/processed/``. Those
  folders must be real folders: if ``processed/`` or ``failed/`` is a link, nothing is moved there
  (the file stays, and the scan says why).

Files configured in ``data.logs`` live elsewhere, are read where they are and never moved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tao_pipeline.common.hashing import file_digest
from tao_pipeline.common.safe_files import UnsafePathError, file_problem, move_into, shown, stat_problem
from tao_pipeline.data.ingest.readers import LOG_SUFFIXES
from tao_pipeline.data.ingest.table_source import export_new_table_rows
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import TaoSettings

USAGE_TABLE = "usage_logs"
IN_PROGRESS_SUFFIXES = (".tmp", ".partial", ".part")  # still being written: read once renamed
DIGEST_CHARS = 12  # of a file's SHA-256, in its batch key
_MAX_ARCHIVE_NAMES = 100


@dataclass
class InboxScan:
    """What the inbox holds now, file by file."""

    ready: dict[str, Path] = field(default_factory=dict)  # batch key -> a file not ingested yet, ready to read
    settling: list[Path] = field(default_factory=list)  # changed less than flywheel.settle_seconds ago
    ingested: list[Path] = field(default_factory=list)  # already in the lake, still in the inbox (to archive)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # never read, and why

    def describe(self, inbox: Path) -> str:
        """Why nothing is ready, for a sensor's skip reason."""
        parts = [f"no new usage-log files in {inbox}"]
        if self.settling:
            parts.append(f"{len(self.settling)} still changing (read once unchanged for flywheel.settle_seconds)")
        if self.refused:
            parts.append(
                f"{len(self.refused)} refused: " + "; ".join(f"{shown(p.name)}: {why}" for p, why in self.refused[:3])
            )
        return ", ".join(parts)

    def refusals(self) -> list[str]:
        """One printable line per entry that is not read (or not archived), and why."""
        return [f"not reading {shown(path)}: {why}" for path, why in self.refused]


def archive_ingested(scan: InboxScan, inbox: Path) -> list[Path]:
    """Move files already in the lake out of the inbox (a run that committed them stopped before); a file
    that cannot be moved safely stays, and ``scan.refused`` says why."""
    archived = []
    for path in scan.ingested:
        try:
            target = archive_file(path, inbox, "processed")
        except UnsafePathError as error:
            scan.refused.append((path, f"ingested, but not archived: {error}"))
            continue
        if target is not None:
            archived.append(target)
    return archived


def batch_key(path: Path, digest: str | None = None) -> str:
    """A log batch's partition key: readable stem plus content hash, e.g. 'app-2026-11-3f2a9c1b04d2'."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.stem)[:40] or "logs"
    return f"{stem}-{(digest or file_digest(path))[:DIGEST_CHARS]}"


def ingested_digests(lake: Lake) -> set[str]:
    """Content hashes (their first DIGEST_CHARS) of every file whose rows are committed to the lake."""
    return {key.rsplit("-", 1)[-1] for key in lake.partitions(USAGE_TABLE)}


def pending_log_files(
    settings: TaoSettings, lake: Lake, known_keys: set[str] | None = None, now: float | None = None
) -> InboxScan:
    """Pull new table rows (if a table source is set), then sort every log file the pipeline may read.

    ``known_keys`` are batch keys already handed out (Dagster's log_batches partitions): a file
    with the same content keeps its key, so a retry reuses the batch instead of opening another.
    """
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    source = settings.flywheel.table_source
    if source is not None:
        export_new_table_rows(source.database, source.table, source.order_column, settings.table_exports_dir)
    return scan_inbox(settings, ingested_digests(lake), known_keys or set(), now)


def scan_inbox(
    settings: TaoSettings, ingested: set[str], known_keys: set[str] | None = None, now: float | None = None
) -> InboxScan:
    now = time.time() if now is None else now
    key_for = {key.rsplit("-", 1)[-1]: key for key in sorted(known_keys or ())}
    scan = InboxScan()
    seen = set(ingested)
    candidates = [(path, settings.flywheel.settle_seconds) for path in _inbox_files(settings.inbox_dir, scan)]
    candidates += [(path, 0.0) for path in _inbox_files(settings.table_exports_dir, scan)]  # written atomically
    candidates += [(Path(path), 0.0) for path in settings.data.logs if _configured_file(Path(path), scan)]
    for path, settle_seconds in candidates:
        try:
            if now - path.stat().st_mtime < settle_seconds:
                scan.settling.append(path)
                continue
            digest = file_digest(path)[:DIGEST_CHARS]
        except FileNotFoundError:
            continue  # moved away meanwhile (another process took it)
        except UnsafePathError as error:  # swapped for a link since it was listed
            scan.refused.append((path, str(error)))
            continue
        if digest in ingested:
            if path.parent == settings.inbox_dir:
                scan.ingested.append(path)
        elif digest not in seen:  # a second copy of the same content, under any name, is not new
            seen.add(digest)
            scan.ready[key_for.get(digest) or batch_key(path, digest)] = path
    return scan


def _inbox_files(folder: Path, scan: InboxScan) -> list[Path]:
    """Regular log files (one link each) directly inside ``folder``; links, hard links, devices, FIFOs and
    names that are not UTF-8 go to ``scan.refused``."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path = Path(entry.path)
        if entry.name.startswith(".") or entry.name.lower().endswith(IN_PROGRESS_SUFFIXES):
            continue
        if not _is_log_name(entry.name):
            continue
        try:
            problem = stat_problem(entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue  # moved away meanwhile
        if problem is not None:
            scan.refused.append((path, f"{problem}: only regular files with one link, inside the inbox, are read"))
        elif not _is_utf8(entry.name):
            scan.refused.append((path, "its name is not valid UTF-8: rename it"))
        else:
            found.append(path)
    return found


def _is_utf8(name: str) -> bool:
    try:
        os.fsencode(name).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _configured_file(path: Path, scan: InboxScan) -> bool:
    """A data.logs file, read where it is: a regular file with one link (a FIFO would block, a hard link
    may be another name for a file the pipeline must not read). Its existence is checked at load time."""
    problem = file_problem(path)
    if problem == "gone":
        scan.refused.append((path, "data.logs names a file that no longer exists"))
    elif problem:
        scan.refused.append((path, f"data.logs names {problem}, not a regular file with one link"))
    return problem is None


def _is_log_name(name: str) -> bool:
    return name.lower().endswith(LOG_SUFFIXES)


def still_a_regular_file(path: Path) -> bool:
    """Checked again just before a file is read: nothing swapped a link in since the scan (the reader
    opens it without following links and checks it again)."""
    return file_problem(path) is None


def archive_file(path: Path, inbox: Path, outcome: str) -> Path | None:
    """Move an inbox file to inbox/<outcome>/ once handled; configured files elsewhere stay put.

    A file another process has already archived (or is archiving) is left to it: None. If
    inbox/<outcome> is not a real folder (a link to somewhere else), UnsafePathError: nothing moves.
    """
    if path.parent.resolve() != inbox.resolve():
        return None
    try:
        for copy in range(_MAX_ARCHIVE_NAMES):
            try:
                return move_into(path, outcome, _archive_name(path, copy))
            except FileExistsError:
                continue  # that name was archived before: the next one
    except FileNotFoundError:
        return None
    raise UnsafePathError(f"{inbox / outcome} already holds {_MAX_ARCHIVE_NAMES} files named after {path.name}")


def _archive_name(path: Path, copy: int) -> str:
    """The file's own name, then its name with its content hash, then with a counter too."""
    if copy == 0:
        return path.name
    tagged = f"{path.stem}-{file_digest(path)[:8]}"
    return f"{tagged}{path.suffix}" if copy == 1 else f"{tagged}-{copy}{path.suffix}"


def plan_ingest_runs(
    known: Sequence[str], ready: Mapping[str, Path], busy: set[str], max_files: int, max_runs: int
) -> list[list[str]]:
    """The ingest runs to request now, each a list of batch keys that are consecutive partitions.

    ``known`` are the log_batches partitions in the order they were added; new ready files come after them,
    in key order, as the sensor adds them. A ready file not in a run in flight (``busy``) is taken: a new
    one, or a known one the sensor takes again (its last run failed). Runs cover ranges of consecutive ready
    partitions, oldest first, at most ``max_files`` each and ``max_runs`` in all (the free ingest slots):
    what does not fit waits for a later tick and then goes in one run, so a burst of files or an ingestion
    that fell behind catches up in a few runs instead of a queue of one run per file.
    """
    known_set = set(known)
    order = [*known, *sorted(key for key in ready if key not in known_set)]
    runs: list[list[str]] = []
    current: list[str] = []
    for key in order:
        wanted = key in ready and key not in busy
        if current and (not wanted or len(current) == max_files):
            runs.append(current)
            current = []
        if wanted:
            current.append(key)
    if current:
        runs.append(current)
    return runs[: max(max_runs, 0)]

"""The inbox: which log files are ready, which are new, and where a handled file goes.

The contract an app follows (README, "The inbox contract"):

- Only regular files directly inside the inbox are read. Symbolic links, devices, FIFOs and
  sockets are refused (never opened), so nothing outside the inbox can be pulled in.
- A file is read only once it has not changed for ``flywheel.settle_seconds``: an app may append
  to a file, and it is read after the app has paused that long. Names ending in ``.tmp``,
  ``.partial`` or ``.part`` (and hidden names) are never read: an app that pauses longer writes
  under such a name and renames the file when it is complete.
- A file is identified by the hash of its content. It counts as ingested once its usage_logs
  partition is in the lake (its kept and quarantined rows are committed together, the usage rows
  last); until then it is retried, and once ingested it is moved to ``inbox/processed/``.

Files configured in ``data.logs`` live elsewhere, are read where they are and never moved.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from tao_pipeline.common.hashing import file_digest
from tao_pipeline.data.ingest.readers import LOG_SUFFIXES
from tao_pipeline.data.ingest.table_source import export_new_table_rows
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import TaoSettings

USAGE_TABLE = "usage_logs"
IN_PROGRESS_SUFFIXES = (".tmp", ".partial", ".part")  # still being written: read once renamed
DIGEST_CHARS = 12  # of a file's SHA-256, in its batch key


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
                f"{len(self.refused)} refused: " + "; ".join(f"{p.name}: {why}" for p, why in self.refused[:3])
            )
        return ", ".join(parts)


def archive_ingested(scan: InboxScan, inbox: Path) -> list[Path]:
    """Move files already in the lake out of the inbox (a run that committed them stopped before)."""
    return [target for path in scan.ingested if (target := archive_file(path, inbox, "processed"))]


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
        if digest in ingested:
            if path.parent == settings.inbox_dir:
                scan.ingested.append(path)
        elif digest not in seen:  # a second copy of the same content, under any name, is not new
            seen.add(digest)
            scan.ready[key_for.get(digest) or batch_key(path, digest)] = path
    return scan


def _inbox_files(folder: Path, scan: InboxScan) -> list[Path]:
    """Regular log files directly inside ``folder``; links, devices and FIFOs go to ``scan.refused``."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path = Path(entry.path)
        if entry.name.startswith(".") or entry.name.lower().endswith(IN_PROGRESS_SUFFIXES):
            continue
        if not _is_log_name(entry.name):
            continue
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            scan.refused.append((path, "a symbolic link: only regular files inside the inbox are read"))
        elif not stat.S_ISREG(mode):
            scan.refused.append((path, "not a regular file (a device, FIFO or socket)"))
        else:
            found.append(path)
    return found


def _configured_file(path: Path, scan: InboxScan) -> bool:
    """A data.logs file, read where it is; it must exist and be a regular file (a FIFO would block)."""
    if not path.exists():
        return False
    if not path.is_file():
        scan.refused.append((path, "data.logs names something that is not a regular file"))
        return False
    return True


def _is_log_name(name: str) -> bool:
    return name.lower().endswith(LOG_SUFFIXES)


def still_a_regular_file(path: Path) -> bool:
    """Checked again just before a file is read: nothing swapped a link in since the scan."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def archive_file(path: Path, inbox: Path, outcome: str) -> Path | None:
    """Move an inbox file to inbox/<outcome>/ once handled; configured files elsewhere stay put.

    A file another process has already archived (or is archiving) is left to it: None.
    """
    if path.parent.resolve() != inbox.resolve():
        return None
    target_dir = inbox / outcome
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    try:
        if target.exists():
            target = target_dir / f"{path.stem}-{file_digest(path)[:8]}{path.suffix}"
        shutil.move(str(path), target)
    except FileNotFoundError:
        return None
    return target

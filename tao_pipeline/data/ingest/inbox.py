"""The inbox: which log files are new, by content hash, and where a handled file goes."""

from __future__ import annotations

import shutil
from pathlib import Path

from tao_pipeline.common.hashing import file_digest
from tao_pipeline.data.ingest.readers import LOG_SUFFIXES
from tao_pipeline.data.ingest.table_source import export_new_table_rows
from tao_pipeline.settings import TaoSettings


def batch_key(path: Path, digest: str | None = None) -> str:
    """A log batch's partition key: readable stem plus content hash, e.g. 'app-2026-11-3f2a9c1b04d2'."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.stem)[:40] or "logs"
    return f"{stem}-{(digest or file_digest(path))[:12]}"


def discover_log_files(folders: list[Path], files: list[Path]) -> list[Path]:
    """Log files directly inside the inbox folders, plus explicitly configured files."""
    found = [
        p
        for folder in folders
        if folder.is_dir()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in LOG_SUFFIXES and not p.name.startswith(".")
    ]
    return found + [Path(f) for f in files if Path(f).is_file()]


def pending_log_files(settings: TaoSettings, known_keys: set[str]) -> dict[str, Path]:
    """Pull new table rows (if a table source is set), then every log file not ingested yet, by key."""
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    source = settings.flywheel.table_source
    if source is not None:
        export_new_table_rows(source.database, source.table, source.order_column, settings.table_exports_dir)
    return new_log_files(discover_log_files(settings.log_folders, settings.data.logs), known_keys)


def new_log_files(paths: list[Path], known_keys: set[str]) -> dict[str, Path]:
    """Batch key -> file for files whose content was never ingested (a renamed copy is not new)."""
    seen = {key.rsplit("-", 1)[-1] for key in known_keys}
    new: dict[str, Path] = {}
    for path in paths:
        digest = file_digest(path)
        if digest[:12] not in seen:
            seen.add(digest[:12])
            new[batch_key(path, digest)] = path
    return new


def archive_file(path: Path, inbox: Path, outcome: str) -> Path | None:
    """Move an inbox file to inbox/<outcome>/ once handled; configured files elsewhere stay put."""
    if path.parent.resolve() != inbox.resolve():
        return None
    target_dir = inbox / outcome
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    if target.exists():
        target = target_dir / f"{path.stem}-{file_digest(path)[:8]}{path.suffix}"
    shutil.move(str(path), target)
    return target

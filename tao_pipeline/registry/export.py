"""Exporting a version as a model folder, without ever removing anything the export did not write.

An export writes a manifest (``.tao-export.json``) listing its files. Exporting again into the
same folder replaces exactly those files; any other destination must be missing or empty. The
same holds for an object-store prefix (``s3://bucket/prefix``), where the manifest is written last.
Folders whose replacement would destroy something else are refused outright: the filesystem
root, the user's home, the working directory, any folder that contains one of those or the
pipeline's home, and the pipeline's own data (lake, models, caches, Dagster instance).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tao_pipeline.common import object_store
from tao_pipeline.common.safe_files import open_regular_file, plain_name

MANIFEST = ".tao-export.json"
_MAX_MANIFEST_BYTES = 1 << 20
_PIPELINE_DATA = ("lake", "models", "cache", "dagster", "reports", "inbox")


class ExportRefused(ValueError):
    """The destination is not one an export may write into; the message says why and what to do."""


def check_destination(destination: Path, tao_home: Path) -> Path:
    """The destination as an absolute path, or ExportRefused naming the problem."""
    target = Path(os.path.abspath(Path(destination).expanduser()))
    if target.is_symlink():
        raise ExportRefused(f"export destination {target} is a symbolic link; give a real folder")
    resolved = target.resolve()
    guarded = {Path("/"), Path.home().resolve(), Path.cwd().resolve(), tao_home.resolve()}
    for place in guarded:
        if resolved == place or place.is_relative_to(resolved):
            raise ExportRefused(
                f"refusing to export into {target}: it is or contains {place}; give a new folder, e.g. ./served-model"
            )
    for folder in _PIPELINE_DATA:
        if resolved.is_relative_to(tao_home.resolve() / folder):
            raise ExportRefused(f"refusing to export into {target}: it is inside the pipeline's own {folder}/ data")
    if resolved.exists() and not resolved.is_dir():
        raise ExportRefused(f"export destination {target} is a file, not a folder")
    blocking = next((parent for parent in resolved.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ExportRefused(f"export destination {target} is inside {blocking}, which is a file, not a folder")
    if resolved.is_dir() and not _written_by_an_export(resolved):
        raise ExportRefused(
            f"export destination {target} is not empty and was not written by `tao export`; "
            "give a new or empty folder (nothing there was touched)"
        )
    return resolved


def export_files(files: list[Path], destination: Path, tao_home: Path, version_id: str) -> Path:
    """Copy ``files`` into ``destination`` (checked first), replacing only a previous export's own files."""
    target = check_destination(destination, tao_home)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        for item in files:
            shutil.copy2(item, staging / item.name)
        manifest = {"version_id": version_id, "files": sorted(item.name for item in files)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        staging.chmod(0o755)
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _written_by_an_export(folder: Path) -> bool:
    """True for an empty folder, or one holding nothing but a previous export's listed files."""
    names = {entry.name for entry in folder.iterdir()}
    if not names:
        return True
    listed = _manifest_files(folder)
    return listed is not None and names <= listed | {MANIFEST}


def _manifest_files(folder: Path) -> set[str] | None:
    """The names a previous export's manifest lists, or None when it is missing, unreadable, or names
    anything but plain entries of that folder (``../x``, an absolute path): such a manifest is not ours."""
    try:
        with open_regular_file(folder / MANIFEST) as handle:
            listed = json.loads(handle.read(_MAX_MANIFEST_BYTES + 1))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(listed, list) or not all(plain_name(name) and name != MANIFEST for name in listed):
        return None
    return set(listed)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename the new export into place; a previous one is moved aside first and then emptied of its
    own listed files only (a file someone added meanwhile keeps the old folder, renamed, beside it)."""
    if not target.exists():
        staging.rename(target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.previous-"))
    aside.rmdir()
    target.rename(aside)
    staging.rename(target)
    for name in [*(_manifest_files(aside) or ()), MANIFEST]:  # plain names only: nothing outside is touched
        entry = aside / name
        if entry.is_symlink() or entry.is_file():
            entry.unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:
        pass  # something not ours appeared there: it stays, in the renamed folder


def export_to_object_store(files: list[Path], url: str, version_id: str) -> str:
    """Upload ``files`` under an object-store prefix that is empty or holds only an earlier export (whose
    files no longer listed are then deleted); the manifest goes last, so a reader that sees it sees all."""
    location = object_store.locate(url)
    present = set(object_store.listed(location))
    earlier = object_store.read_json(location, MANIFEST)
    earlier_files = earlier.get("files") if earlier else None
    if present and not (
        isinstance(earlier_files, list)
        and all(plain_name(name) for name in earlier_files)
        and present <= set(earlier_files) | {MANIFEST}
    ):
        raise ExportRefused(
            f"export destination {url} is not empty and was not written by `tao export`; give a new prefix "
            "(nothing there was touched)"
        )
    names = sorted(item.name for item in files)
    object_store.upload_files(files, location, MANIFEST, {"version_id": version_id, "files": names})
    object_store.delete(location, sorted(set(earlier_files or ()) - set(names)))
    return location.url

"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every file the pipeline writes (lake partitions, cache shards, reports, exports of table rows)
goes through :func:`atomic_path`; every directory (models, checkpoints) through
:func:`atomic_directory`. Both build beside the target and rename into place, so a killed
process leaves at most a hidden temp entry, never a truncated target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """A temp path beside ``target`` to write to; renamed onto ``target`` when the block succeeds and
    removed when it raises. The caller writes the whole file (and closes any writer) inside the block."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def atomic_directory(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temp sibling with ``build(staging)`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    staging.chmod(0o755)
    try:
        build(staging)
        if target.is_symlink():  # a link (perhaps to a folder that is gone) is replaced, never followed
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target

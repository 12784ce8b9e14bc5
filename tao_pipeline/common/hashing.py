"""Content hashes: the ids of rows, files, cache entries and checkpoints are hashes of what they hold."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tao_pipeline.common.safe_files import open_regular_file

_FILE_BLOCK = 1 << 20


def content_hash(*parts: str | None) -> str:
    """A short (16 hex digits) SHA-256 of the parts, separated so ("ab", "c") differs from ("a", "bc")."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part or "").encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """The full SHA-256 of a file's bytes, read in blocks; only a regular file with one link is read."""
    digest = hashlib.sha256()
    with open_regular_file(path) as handle:
        for block in iter(lambda: handle.read(_FILE_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def text_digest(text: str) -> str:
    """The full SHA-256 of a text (e.g. a canonical JSON request), for cache keys."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

"""Paths from outside, checked: the product reads, writes, moves and deletes only where it owns.

A path a user, an app or a file (a manifest, a log) hands the pipeline may be a symbolic link, a
hard link to a file elsewhere, a FIFO that blocks whoever opens it, a device, or a name such as
``../x``. Everything here refuses those with a reason instead of following them:

- :func:`open_regular_file` opens without following a link or blocking, then checks what it got;
- :func:`file_problem` says why a directory entry may not be read, without opening it;
- :func:`plain_name` accepts a name from a file only if it names an entry of one folder;
- :func:`real_subfolder` is a folder inside its parent that is really there (not a link);
- :func:`move_into` renames an entry into a subfolder through directory handles, so a folder
  swapped for a link between a check and the move is never followed.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO


class UnsafePathError(OSError):
    """A path is not what the product may touch there; the message says what it is and what to do."""


def describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def stat_problem(info: os.stat_result, single_link: bool = True) -> str | None:
    """Why an entry with this lstat/fstat may not be read as a file of ours, or None."""
    if not stat.S_ISREG(info.st_mode):
        return describe_mode(info.st_mode)
    if single_link and info.st_nlink > 1:
        return f"a hard link ({info.st_nlink} names for one file, some of them elsewhere)"
    return None


def file_problem(path: Path, single_link: bool = True) -> str | None:
    """Why ``path`` may not be read (a link, a FIFO, a hard link, ...), without opening it; None if it may."""
    try:
        return stat_problem(os.lstat(path), single_link)
    except FileNotFoundError:
        return "gone"
    except OSError as error:
        return f"cannot be examined ({error.strerror})"


def open_regular_file(path: Path | str, single_link: bool = True) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file with one link (never follows a
    symbolic link in its last component, never blocks on a FIFO); UnsafePathError otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == getattr(os, "ELOOP", 40):
            raise UnsafePathError(error.errno, f"{path} is a symbolic link; only regular files are read") from None
        raise
    try:
        problem = stat_problem(os.fstat(fd), single_link)
        if problem:
            raise UnsafePathError(f"{path} is {problem}; only regular files with one link are read")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def shown(path: Path | str) -> str:
    """A path as text that can be printed and stored: bytes that are not UTF-8 appear as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def plain_name(name: object) -> bool:
    """Whether ``name`` (from a manifest, a log, a setting) names an entry directly inside one folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, both resolved (links followed)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def real_subfolder(parent: Path, name: str, create: bool = True) -> Path:
    """``parent/name`` as a real folder (created when missing), or UnsafePathError when it is a link,
    a file or anything else, so nothing is ever written through it to another place."""
    if not plain_name(name):
        raise UnsafePathError(f"{name!r} is not a plain folder name")
    folder = Path(parent) / name
    if create:
        try:
            folder.mkdir()
        except FileExistsError:
            pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(
            f"{folder} is {describe_mode(info.st_mode)}, not a folder; nothing is moved or written there: "
            "replace it with a real folder"
        )
    return folder


def move_into(source: Path, folder_name: str, target_name: str) -> Path:
    """Rename ``source`` into ``<its folder>/<folder_name>/<target_name>``, through handles on both
    folders (opened without following links): a subfolder swapped for a link is never followed.
    FileExistsError when the target name is taken (it is never replaced)."""
    if not plain_name(target_name):
        raise UnsafePathError(f"{target_name!r} is not a plain file name")
    parent = Path(source).parent
    real_subfolder(parent, folder_name)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            folder_fd = os.open(folder_name, flags, dir_fd=parent_fd)
        except OSError as error:
            raise UnsafePathError(f"{parent / folder_name} is not a real folder: {error.strerror}") from None
        try:
            try:
                os.stat(target_name, dir_fd=folder_fd, follow_symlinks=False)
                raise FileExistsError(f"{parent / folder_name / target_name} exists")
            except FileNotFoundError:
                pass
            os.rename(Path(source).name, target_name, src_dir_fd=parent_fd, dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
    finally:
        os.close(parent_fd)
    return parent / folder_name / target_name

"""One clear line for every error a `tao` command meets, never a traceback.

Errors the product raises on purpose (a bad setting, a locked or corrupt file, a refused path)
carry their own one-line message. Operating-system errors (a full disk, a permission) are named
with the file and what to do. Anything else is a bug: its traceback goes to a file, and the line
names the file so it can be reported; ``TAO_DEBUG=1`` re-raises it instead.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
import traceback
from pathlib import Path

import click

from tao_pipeline.common.safe_files import shown

DEBUG_ENV = "TAO_DEBUG"


class TaoGroup(click.Group):
    """The `tao` group: every command's unexpected error becomes one line (click's ``Error: ...``)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as error:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(one_line(error)) from None


_NO_SPACE = ("no space left on device", "database or disk is full")  # the OS's words, SQLite's words


def one_line(error: BaseException) -> str:
    """What went wrong, in one line, with what to do where the error says."""
    if _out_of_space(error):
        return NO_SPACE
    if isinstance(error, OSError) and error.errno is not None and type(error).__module__ == "builtins":
        return _os_error(error)
    if _is_ours(error) or isinstance(error, OSError):
        return _squashed(str(error)) or type(error).__name__
    return _unexpected(error)


def _is_ours(error: BaseException) -> bool:
    """An error the product raises with a message meant for the user (its own exception types)."""
    return type(error).__module__.startswith("tao_pipeline.")


NO_SPACE = "no space left on the device: free some space and run the command again (nothing half-written is kept)"


def _out_of_space(error: BaseException | None) -> bool:
    """A full disk, however deep in the chain (an OSError, or a database driver's error about it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or any(words in str(error).lower() for words in _NO_SPACE):
            return True
        error = error.__cause__ or error.__context__
    return False


def _os_error(error: OSError) -> str:
    where = f" ({shown(error.filename)})" if error.filename is not None else ""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{error.strerror}{where}: check the owner and permissions"
    return f"{error.strerror or _squashed(str(error)) or type(error).__name__}{where}"


def _unexpected(error: BaseException) -> str:
    report = Path(tempfile.gettempdir()) / f"tao-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        report.write_text("".join(traceback.format_exception(error)), encoding="utf-8", errors="backslashreplace")
        where = f"the traceback is in {report}"
    except OSError:
        where = f"set {DEBUG_ENV}=1 to see the traceback"
    return f"unexpected {type(error).__name__}: {_squashed(str(error))[:300]} ({where}; please report it)"


def _squashed(text: str) -> str:
    return " ".join(text.split())

"""A child process that never outlives the command that started it (`tao ui` runs `dagster dev`).

The child asks the kernel for SIGTERM when its parent dies, however it dies (SIGKILL included;
Linux), and the parent forwards SIGTERM, SIGINT and SIGHUP to it and waits for it to shut down
(`dagster dev` then stops its webserver and daemon), killing it if it does not within a grace.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

SHUTDOWN_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1


def run_tied_to_this_process(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` to completion and return its exit status."""
    child = subprocess.Popen(list(command), env=dict(env), preexec_fn=_die_with_parent)

    def forward(signum: int, _frame) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        killer = threading.Timer(SHUTDOWN_GRACE_S, child.kill)  # it had its chance to shut down
        killer.daemon = True
        killer.start()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        return child.wait()
    finally:
        if child.poll() is None:  # this process is going down some other way
            child.kill()


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

"""A child process tree that never outlives the command that started it (`tao ui` runs `dagster dev`).

`dagster dev` starts a webserver, a daemon and code servers, and on SIGTERM waits up to a minute for
each to stop before it kills it. Killed itself before that (or killed while its children still load
the code location), it leaves them running. So the command runs under a small supervisor, this
file run as a script (standard library only, so it starts at once):

- the supervisor asks the kernel for SIGTERM when its parent (`tao ui`) dies, however it dies
  (SIGKILL included; Linux);
- it starts the command as a process group of its own, so every process under it can be found;
- on SIGTERM, SIGINT or SIGHUP it asks the command to shut down (SIGTERM), and kills the whole group
  if it has not within ``SHUTDOWN_GRACE_S``; when the command ends it kills whatever is left in its
  group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress

SHUTDOWN_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_tied_to_this_process(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` under the supervisor to completion and return its exit status."""
    supervisor = subprocess.Popen([sys.executable, __file__, *command], env=dict(env), preexec_fn=_die_with_parent)
    for signum in _SHUTDOWN_SIGNALS:
        signal.signal(signum, lambda _signum, _frame: supervisor.send_signal(signal.SIGTERM))
    try:
        return supervisor.wait()
    finally:
        if supervisor.poll() is None:  # this process is going down some other way: the supervisor cleans up
            supervisor.send_signal(signal.SIGTERM)


def supervise(command: Sequence[str]) -> int:
    """Run ``command`` as its own process group; stop the whole group on a shutdown signal or when it ends."""
    child = subprocess.Popen(list(command), start_new_session=True)
    group = child.pid

    def shut_down(_signum: int, _frame) -> None:
        with suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)  # the command alone: it stops its own children first
        killer = threading.Timer(SHUTDOWN_GRACE_S, _kill_group, args=(group,))
        killer.daemon = True
        killer.start()

    for signum in _SHUTDOWN_SIGNALS:
        signal.signal(signum, shut_down)
    try:
        return child.wait()
    finally:
        _kill_group(group)  # what the command left behind (a code server, a stuck daemon)


def _kill_group(group: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))

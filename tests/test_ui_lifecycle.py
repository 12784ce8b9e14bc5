"""Killing `tao ui` leaves nothing running: not `dagster dev`, not its webserver, not its daemon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = pytest.mark.ui  # starts the real webserver and daemon

STARTUP_TIMEOUT_S = 240
SHUTDOWN_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`tao ui` on a free loopback port, once its webserver answers; with every process under it."""
    port, log = free_port(), tmp_path / "tao-ui.log"
    env = {**os.environ, "TAO_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tao_pipeline.cli", "ui", "--port", str(port), "--set", "data.logs=[]"]
    with log.open("wb") as out:
        ui = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert ui.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        ui.kill()
        raise AssertionError("the webserver never answered:\n" + log.read_text(errors="replace")[-3000:])
    descendants = psutil.Process(ui.pid).children(recursive=True)
    assert len(descendants) >= 3, descendants  # dagster dev, its webserver, its daemon (at least)
    return ui, descendants


def gone(processes: list[psutil.Process]) -> bool:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return not alive


@pytest.mark.parametrize("kill_with", [signal.SIGTERM, signal.SIGKILL])
def test_killing_tao_ui_stops_everything_it_started(tmp_path, kill_with):
    ui, descendants = start_ui(tmp_path)
    try:
        os.kill(ui.pid, kill_with)
        ui.wait(timeout=SHUTDOWN_TIMEOUT_S)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while time.monotonic() < deadline and not gone(descendants):
            time.sleep(0.5)
        assert gone(descendants), [(p.pid, p.name()) for p in descendants if p.is_running()]
    finally:
        for process in [psutil.Process(ui.pid) if psutil.pid_exists(ui.pid) else None, *descendants]:
            try:
                if process is not None:
                    process.kill()
            except psutil.NoSuchProcess:
                pass

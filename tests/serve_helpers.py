"""`tao serve` on a free loopback port inside the test process (uvicorn in a thread), and its settings."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tao_pipeline.registry import ModelStore
from tao_pipeline.serving.server import build_server
from tao_pipeline.settings import TaoSettings, load_settings


def jsonl_lines(path: Path) -> list[str]:
    """A served log file's lines as ingestion reads them: each ends at "\\n" only. ``str.splitlines`` would also
    cut at U+2028, U+0085 and the like, which an answer may hold raw (JSON escapes only control characters)."""
    with path.open(encoding="utf-8", newline="\n") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_config(directory: Path, model_dir: Path, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "tao.toml"
    config.write_text(f"""
home = "{directory / "home"}"

[model]
base = "{model_dir}"
dtype = "float32"

[serve]
swap_poll_seconds = 0.2
log_roll_seconds = 0.5
batch_window_ms = 50
default_max_tokens = 8
{extra}
""")
    return config


@dataclass
class RunningServer:
    url: str  # the OpenAI base URL, .../v1
    root: str
    app: FastAPI
    settings: TaoSettings

    @property
    def engine(self):
        return self.app.state.engine


@contextmanager
def running_server(settings: TaoSettings, port: int | None = None) -> Iterator[RunningServer]:
    app = build_server(settings)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("tao serve did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(30)


def register_checkpoint(settings: TaoSettings, model_dir: Path, version_id: str, parent: str) -> None:
    """A checkpoint in the registry as a round leaves one (weights copied into the model store)."""
    store = ModelStore(settings.models_dir)
    target = store.checkpoint_dir(version_id)
    shutil.copytree(model_dir, target)
    store.register(version_id, target, parent_version=parent, round_id="round-0001", method="dpo+lora",
                   hyperparameters={}, metrics={})  # fmt: skip


def load(config: Path, *overrides: str) -> TaoSettings:
    return load_settings(config, list(overrides))


def raw_exchange(port: int, head: str, body: bytes = b"", *, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send ``head`` (the request line and headers, without the blank line) and ``body`` over a plain socket,
    and read the response: a client that says it sends more than it does, or sends it slowly."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", len(rest)))
        while len(rest) < length:
            chunk = connection.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest


class Relay:
    """A TCP relay in front of a server that can be frozen: connections are then accepted and nothing more
    passes either way, as with a hung upstream (a stuck GPU process, a dead network path)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.frozen.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets.append(upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            source.settimeout(None)
            while data := source.recv(65536):
                while self.frozen.is_set() and not self._closed:
                    time.sleep(0.05)  # hold the bytes: the peer waits forever
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.frozen.clear()
        for connection in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                connection.close()

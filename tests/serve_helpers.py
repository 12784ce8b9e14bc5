"""`tao serve` on a free loopback port inside the test process (uvicorn in a thread), and its settings."""

from __future__ import annotations

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

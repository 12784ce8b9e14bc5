"""Assembles `tao serve` from the settings: the engine, the champion watcher, the request log, the app."""

from __future__ import annotations

import ipaddress
import os
import socket

from fastapi import FastAPI

from tao_pipeline.common.threads import usable_cpus
from tao_pipeline.registry import ModelStore
from tao_pipeline.serving.app import build_app
from tao_pipeline.serving.champion import ChampionWatcher
from tao_pipeline.serving.engine import Engine
from tao_pipeline.serving.live import LiveRouter
from tao_pipeline.serving.local import LocalEngine
from tao_pipeline.serving.proxy import ProxyEngine
from tao_pipeline.serving.request_log import RequestLog, open_inbox
from tao_pipeline.settings import TaoSettings

REGISTRY_POLL_LOCK_S = 2.0  # a poll gives up on a locked registry quickly and tries again next time


class ServeRefused(ValueError):
    """The settings would expose the server unsafely or cannot work; the message says what to change."""


def build_server(settings: TaoSettings) -> FastAPI:
    serve = settings.serve
    keys = api_keys(serve.api_keys_env)
    if not is_loopback(serve.host) and not keys:
        raise ServeRefused(
            f"serve.host={serve.host!r} is reachable beyond this machine: set bearer keys in the environment "
            f"variable {serve.api_keys_env} (comma-separated), or bind to 127.0.0.1"
        )
    store = ModelStore(settings.models_dir, lock_timeout_s=REGISTRY_POLL_LOCK_S)
    watcher = ChampionWatcher(store, settings.model, serve.swap_poll_seconds)
    if serve.log_requests:
        try:
            os.close(open_inbox(settings.inbox_dir))
        except OSError as error:
            raise ServeRefused(f"serve.log_requests: cannot write into the inbox: {error.strerror or error}") from None
    request_log = (
        RequestLog(
            settings.inbox_dir,
            roll_rows=serve.log_roll_rows,
            roll_seconds=serve.log_roll_seconds,
            log_responses=serve.log_responses,
            drop_fields=tuple(serve.drop_fields),
        )
        if serve.log_requests
        else None
    )
    live = LiveRouter(
        store, lambda: build_engine(settings), serve.swap_poll_seconds, serve.request_timeout_s, settings.live
    )
    return build_app(build_engine(settings), watcher, serve, request_log, keys, live)


def build_engine(settings: TaoSettings) -> Engine:
    serve = settings.serve
    if serve.engine == "proxy":
        base_version = ModelStore(settings.models_dir).resolve_base(settings.model)[0]
        return ProxyEngine(
            serve.upstream_url,
            api_key=_upstream_key(serve.upstream_api_key_env),
            model_names=serve.upstream_model_names,
            load_lora_adapters=serve.load_lora_adapters,
            upstream_base_version=base_version,
            stall_s=serve.upstream_stall_s,
            probe_seconds=serve.upstream_probe_seconds,
            breaker_failures=serve.breaker_failures,
            breaker_cooldown_s=serve.breaker_cooldown_s,
        )
    return LocalEngine(
        dtype=settings.model.dtype,
        max_batch_rows=serve.max_batch_rows,
        batch_window_s=serve.batch_window_ms / 1000,
        prefill_chunk_tokens=serve.prefill_chunk_tokens,
        long_row_tokens=serve.long_row_tokens,
        long_rows_share=serve.long_rows_share,
        max_context_tokens=serve.max_context_tokens,
        threads=serve.threads or default_threads(),
        trust_remote_code=settings.model.trust_remote_code,
    )


def default_threads() -> int:
    """Half the CPUs this process may use: under load, batching with few threads beats many threads
    fighting the tokenizer, the HTTP server and other processes for the cores (one thread won on 2 busy cores)."""
    return max(1, usable_cpus() // 2)


def api_keys(variable: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in os.environ.get(variable, "").split(",") if key.strip())


def _upstream_key(variable: str | None) -> str | None:
    if not variable:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise ServeRefused(f"serve.upstream_api_key_env: environment variable {variable!r} is not set")
    return key


def is_loopback(host: str) -> bool:
    """True only when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)

"""Follows the registry's champion: when a round promotes, or someone runs `tao promote` or
`tao rollback`, the server swaps to the new champion within ``swap_poll_seconds`` plus its load time.

A registry that is locked or a checkpoint that cannot be loaded keeps the current champion
serving; the failure is logged, shown in /health, and the swap is tried again on the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import duckdb

from tao_pipeline.registry import ModelNotFoundError, ModelStore, ModelVersion
from tao_pipeline.serving.engine import Engine, SwapError
from tao_pipeline.settings import ModelSettings

logger = logging.getLogger("tao_pipeline.serve")
WATCHED_ERRORS = (SwapError, ModelNotFoundError, duckdb.Error, OSError)


class ChampionWatcher:
    def __init__(self, store: ModelStore, model: ModelSettings, poll_seconds: float):
        self.store, self.model, self.poll_seconds = store, model, poll_seconds
        self.on_swap: Callable[[str, bool], None] = lambda version, first: None  # (version, first load)
        self.swap_count = 0
        self.last_error: str | None = None
        self._known: set[str] = set()
        self._engine: Engine | None = None
        self._task: asyncio.Task | None = None
        self._started = False

    async def start(self, engine: Engine) -> None:
        """Load the current champion (the configured base model before any promotion) and start polling.

        If it cannot be loaded yet (an upstream still starting, a locked registry), the server starts
        anyway, answers 503 with the reason, and tries again on every poll."""
        self._engine = engine
        try:
            await self._start_engine()
        except WATCHED_ERRORS as error:
            self._failed(error)
        self._task = asyncio.create_task(self._poll())

    @property
    def ready(self) -> bool:
        return self._started

    async def _start_engine(self) -> None:
        champion = await asyncio.to_thread(self.store.champion, self.model, lambda line: logger.info(line))
        await asyncio.to_thread(self.store.require_complete, champion.version_id)
        await self._engine.start(champion)
        self._started, self.last_error = True, None
        await asyncio.to_thread(self._refresh_known)
        logger.info("tao serve: serving %s (%s engine)", champion.version_id, self._engine.name)
        self.on_swap(champion.version_id, True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def knows(self, version_id: str) -> bool:
        """A version this registry holds: a client may still name the champion it saw before a swap. The one this
        server serves always: /v1/models lists it the moment it is swapped in, before the registry is read again
        (a proxy in front names it from then on)."""
        serving = self._engine.version if self._engine is not None else None
        return version_id == serving or version_id in self._known

    def status(self) -> dict:
        return {"ready": self._started, "swaps": self.swap_count, "last_swap_error": self.last_error}

    async def check_now(self) -> None:
        """One poll: swap if the registry names another champion."""
        current = await asyncio.to_thread(self.store.champion_id)
        if current is None or current == self._engine.version:
            return
        started = time.perf_counter()
        version: ModelVersion = await asyncio.to_thread(self.store.require_complete, current)
        await self._engine.switch_to(version)
        self.swap_count += 1
        seconds = time.perf_counter() - started
        self.last_error = None
        await asyncio.to_thread(self._refresh_known)
        self.on_swap(current, False)
        logger.info("tao serve: now serving %s (swap took %.1f s)", current, seconds)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await (self.check_now() if self._started else self._start_engine())
            except WATCHED_ERRORS as error:
                self._failed(error)

    def _failed(self, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        if message != self.last_error:
            serving = f"keeping {self._engine.version}" if self._started else "no model to serve yet"
            logger.error("tao serve: %s: %s", serving, message)
        self.last_error = message

    def _refresh_known(self) -> None:
        self._known = set(self.store.versions()["version_id"])

"""Which version answers a request while a live experiment runs (``tao shadow`` / ``tao canary``).

The registry holds the experiment (:meth:`ModelStore.start_live`); the server polls it like the
champion and starts a second engine for the challenger. A **canary** answers a fixed share of the
conversations, chosen by a hash of the user (OpenAI's ``user`` field) or, without one, of the
conversation's opening (its system message and first user turn), so one conversation stays with one
version. In **shadow** mode the champion answers every request and the challenger answers the same
request in the background, logged beside it and never returned. Deciding is not done here: the
answers reach the lake through the inbox, and :mod:`tao_pipeline.live.evidence` judges them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from tao_pipeline.registry import LiveExperiment, ModelStore
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.serving.engine import Engine

logger = logging.getLogger(__name__)
CHAMPION, CANARY, SHADOW = "champion", "canary", "shadow"


def sticky_key(user: str | None, messages: list[dict[str, str]] | None, prompt: str | None) -> str:
    """Who or what a routing decision sticks to: the user, else the conversation's opening."""
    if user:
        return f"user:{user}"
    if messages:
        opening = [m for m in messages if m["role"] == "system"][:1] + [m for m in messages if m["role"] == "user"][:1]
        return "conversation:" + "\x1f".join(f"{m['role']}:{m['content']}" for m in opening)
    return f"prompt:{prompt or ''}"


def in_canary(key: str, version_id: str, share: float) -> bool:
    """Stable for a key and a version: the same users see a canary for as long as it runs."""
    digest = hashlib.sha256(f"{version_id}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class LiveRouter:
    def __init__(
        self, store: ModelStore, make_engine: Callable[[], Engine], poll_seconds: float, drain_seconds: float = 300.0
    ):
        self.store, self.make_engine, self.poll_seconds = store, make_engine, poll_seconds
        self.drain_seconds = drain_seconds
        self.experiment: LiveExperiment | None = None
        self.challenger: Engine | None = None
        self.last_error: str | None = None
        self.shadow_slots = asyncio.Semaphore(8)  # background answers at once; more are skipped, not queued
        self._task: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return self.experiment is not None and self.challenger is not None

    def arm(self, key: str) -> str:
        """The version that answers: the canary for its share of keys, else the champion."""
        experiment = self.experiment
        if self.challenger is None or experiment is None or experiment.mode != CANARY:
            return CHAMPION
        return CANARY if in_canary(key, experiment.version_id, experiment.share) else CHAMPION

    @property
    def shadowing(self) -> bool:
        return self.active and self.experiment.mode == SHADOW

    async def start(self) -> None:
        await self.check_now()
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._close_challenger()

    async def check_now(self) -> None:
        """Follow the registry: start the challenger's engine, switch it, or stop it."""
        try:
            running = await asyncio.to_thread(self.store.live_experiment)
        except Exception as error:  # noqa: BLE001 - a locked or missing registry keeps what runs
            self._failed(error)
            return
        if running == self.experiment and (running is None or self.challenger is not None):
            return
        await self._close_challenger()
        self.experiment = running
        if running is None:
            logger.info("tao serve: no live experiment")
            return
        try:
            version = await asyncio.to_thread(self.store.require_complete, running.version_id)
            engine = self.make_engine()
            await engine.start(version)
        except (ModelNotFoundError, Exception) as error:  # noqa: BLE001 - the champion keeps answering everything
            self._failed(error)
            return
        self.challenger, self.last_error = engine, None
        logger.info("tao serve: %s of %s started (share %.2f)", running.mode, running.version_id, running.share)

    def status(self) -> dict | None:
        if self.experiment is None:
            return None
        return {
            "mode": self.experiment.mode,
            "version": self.experiment.version_id,
            "share": self.experiment.share,
            "serving": self.challenger is not None,
            "error": self.last_error,
        }

    async def _close_challenger(self) -> None:
        """No new request goes to the challenger; those it is answering finish first (up to drain_seconds)."""
        challenger, self.challenger = self.challenger, None
        if challenger is None:
            return
        deadline = time.monotonic() + self.drain_seconds
        while time.monotonic() < deadline:
            status = challenger.status()
            if not status.get("running_rows", 0) and not status.get("queued_rows", 0):
                break
            await asyncio.sleep(0.1)
        await challenger.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.check_now()

    def _failed(self, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        if message != self.last_error:
            logger.error("tao serve: the live challenger does not answer: %s", message)
        self.last_error = message

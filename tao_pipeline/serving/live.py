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

from tao_pipeline.common.confidence_sequence import RunningBounds
from tao_pipeline.common.pairing import PairsInTime
from tao_pipeline.registry import LiveExperiment, ModelStore
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.serving.engine import Engine
from tao_pipeline.settings import LiveSettings

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


class FailurePairs:
    """The requests of the two arms and their server errors, each challenger request paired with the champion
    request next to it in time (a request waits for the other arm's next one; an older one still waiting is
    dropped), so an outage that fails both arms adds nothing against the challenger. The always-valid bounds
    on (challenger failed - champion failed) are kept pair by pair, in constant memory."""

    def __init__(self, confidence: float = 0.95) -> None:
        self.counts: dict[str, list[int]] = {}  # per arm: [requests, failures]
        self.bounds = RunningBounds(1 - confidence)
        self._in_time = PairsInTime()

    @property
    def pairs(self) -> int:
        return self.bounds.n

    def add(self, arm: str, failed: bool) -> bool:
        """Count one request; True when it completed a pair."""
        counts = self.counts.setdefault(arm, [0, 0])
        counts[0] += 1
        counts[1] += int(failed)
        difference = self._in_time.add(arm != CHAMPION, int(failed))
        if difference is None:
            return False
        self.bounds.add(difference)
        return True


def error_guard(pairs: FailurePairs, guard: LiveSettings) -> str | None:
    """Why the challenger must go on its failures alone, or None: its share of server errors proven above the
    champion's by more than ``live.max_error_rate``, by the always-valid interval (checked after every pair)."""
    if pairs.pairs == 0 or pairs.bounds.low <= guard.max_error_rate:
        return None
    described = ", ".join(f"{arm} {failed} of {requests}" for arm, (requests, failed) in sorted(pairs.counts.items()))
    return (
        f"error guard: the challenger fails more often than the champion by at least {pairs.bounds.low:.1%} "
        f"({guard.confidence:.0%}, always valid, {pairs.pairs} pairs; failed: {described}); "
        f"live.max_error_rate={guard.max_error_rate}"
    )


class LiveRouter:
    def __init__(
        self,
        store: ModelStore,
        make_engine: Callable[[], Engine],
        poll_seconds: float,
        drain_seconds: float = 300.0,
        guard: LiveSettings | None = None,
    ):
        self.store, self.make_engine, self.poll_seconds = store, make_engine, poll_seconds
        self.drain_seconds = drain_seconds
        self.guard = guard or LiveSettings()
        self.outcomes = FailurePairs(self.guard.confidence)  # this server's requests per arm, this experiment
        self.rolled_back: str | None = None  # why this server ended the experiment, if it did
        self.experiment: LiveExperiment | None = None
        self.challenger: Engine | None = None
        self.draining: Engine | None = None  # a challenger whose experiment ended, finishing what it was given
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
        if running is not None and self.challenger is not None and running.version_id == self.experiment.version_id:
            logger.info("tao serve: %s of %s (its engine kept)", running.mode, running.version_id)
            self.experiment, self.outcomes, self.rolled_back = running, FailurePairs(self.guard.confidence), None
            return
        await self._close_challenger()
        if running != self.experiment:
            self.outcomes, self.rolled_back = FailurePairs(self.guard.confidence), None
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

    def answered(self, arm: str, failed: bool) -> None:
        """Count one request of ``arm`` (failed: a server error). The error guard may end the experiment in
        the registry at once, without waiting for the lake: a failing challenger hurts its users now."""
        if self.experiment is None:
            return
        paired = self.outcomes.add(arm, failed)
        if not paired or self.rolled_back is not None:
            return
        reason = error_guard(self.outcomes, self.guard)
        if reason is not None:
            self.rolled_back = reason
            counts = {name: list(counted) for name, counted in self.outcomes.counts.items()}
            evidence = {"decision": "roll back", "n": self.outcomes.pairs, "metric": "server errors",
                        "reason": reason, "requests_and_failures": counts}  # fmt: skip
            _background(self._roll_back(self.experiment, evidence))

    async def _roll_back(self, experiment: LiveExperiment, evidence: dict) -> None:
        logger.error("tao serve: rolling back %s: %s", experiment.version_id, evidence["reason"])
        try:
            await asyncio.to_thread(self._end_if_running, experiment, evidence)
        except Exception as error:  # noqa: BLE001 - a locked registry: the next failure tries again
            self.rolled_back = None
            self._failed(error)
            return
        await self.check_now()

    def _end_if_running(self, experiment: LiveExperiment, evidence: dict) -> None:
        if self.store.live_experiment() == experiment:  # not one started since
            self.store.end_live("rolled back", evidence, promote=False)

    def status(self) -> dict | None:
        if self.experiment is None:
            return None
        return {
            "mode": self.experiment.mode,
            "version": self.experiment.version_id,
            "share": self.experiment.share,
            "serving": self.challenger is not None,
            "error": self.last_error,
            "requests_and_failures": self.outcomes.counts,
            "rolled_back": self.rolled_back,
        }

    async def _close_challenger(self) -> None:
        """No request for the alias goes to the challenger any more; those it is answering finish first (up to
        drain_seconds: a local engine's rows, a proxy's requests still waiting for their answer). For two poll
        intervals it still answers requests that name it (``draining``): a proxy in front, polling the same
        registry, may not have seen the experiment end yet, and its request must get the version it names,
        never the champion's answer under the challenger's name."""
        challenger, self.challenger = self.challenger, None
        if challenger is None:
            return
        self.draining = challenger
        now = time.monotonic()
        grace, deadline = now + 2 * self.poll_seconds, now + self.drain_seconds
        try:
            while time.monotonic() < deadline:
                status = challenger.status()
                idle = not any(status.get(key, 0) for key in ("running_rows", "queued_rows", "in_flight_requests"))
                if idle and time.monotonic() >= grace:
                    break
                await asyncio.sleep(0.1)
        finally:
            self.draining = None
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


_BACKGROUND: set[asyncio.Task] = set()


def _background(work) -> None:
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)

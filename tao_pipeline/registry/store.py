"""The model store: base models, every checkpoint, and the registry of versions.

Layout under ``<home>/models``::

    base/<name>/                 the embedded base model, converted once to safetensors
    checkpoints/<version_id>/    merged weights (loadable by transformers/vLLM) + adapter/
    registry.duckdb              one row per version: parent, round, method, metrics, promoted

Weights are saved as safetensors only. Every directory is written to a temp folder
first and renamed into place, so a killed process never leaves a half checkpoint.

The registry is opened for one short transaction at a time (waiting while another process,
e.g. a concurrent round, holds its lock) and never held open across a download or training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.common.object_store import download_folder, is_object_url
from tao_pipeline.data.lake import connect_duckdb
from tao_pipeline.registry.embedded import EMBEDDED_NAME, convert_embedded_model
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.registry.export import MANIFEST, export_files, export_to_object_store
from tao_pipeline.settings import EMBEDDED_MODEL, ModelSettings

_NOT_EXPORTED = {"training_log.json"}
REGISTRY_ADVICE = (
    "restore it from a backup, or move it away to start a new registry (the checkpoints stay in models/checkpoints/)"
)
_REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version_id VARCHAR PRIMARY KEY,
    parent_version VARCHAR,
    round VARCHAR,
    method VARCHAR,
    path VARCHAR,
    hyperparameters VARCHAR,
    metrics VARCHAR,
    promoted BOOLEAN DEFAULT FALSE,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS promotions (
    version_id VARCHAR,
    action VARCHAR,
    reason VARCHAR,
    decided_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS live_experiments (
    version_id VARCHAR,
    champion_version VARCHAR,
    mode VARCHAR,
    share DOUBLE,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    outcome VARCHAR,
    evidence VARCHAR
);
"""
LIVE_MODES = ("shadow", "canary")


@dataclass(frozen=True)
class LiveExperiment:
    """A challenger on live traffic: ``shadow`` (answers every request in the background, never returned)
    or ``canary`` (answers ``share`` of the conversations, sticky per user or conversation)."""

    version_id: str
    champion_version: str
    mode: str
    share: float
    started_at: datetime


@dataclass(frozen=True)
class ModelVersion:
    version_id: str
    path: Path
    parent_version: str | None  # the model it was built on: its round's candidates, its gate's champion
    round: str | None
    method: str
    promoted: bool
    weights_from: str | None = None  # where its weights started when not its parent's (flywheel.start_from = base)

    @property
    def tuned_from(self) -> str | None:
        """The version whose weights were tuned into this one (a LoRA adapter's base); None for a base model."""
        return self.weights_from or self.parent_version


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ModelStore:
    def __init__(self, root: Path | str, lock_timeout_s: float | None = None):
        """``lock_timeout_s``: how long to wait for another process's lock on the registry (None: the
        lake's default, long enough for any step; a command a person waits on passes less)."""
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.duckdb"

    def checkpoint_dir(self, version_id: str) -> Path:
        return self.root / "checkpoints" / version_id

    # -- base models ---------------------------------------------------------------

    def resolve_base(self, model: ModelSettings, log: Callable[[str], None] = print) -> tuple[str, Path | str]:
        """Return (version_id, loadable path or hub id) of the configured base model."""
        if model.base == EMBEDDED_MODEL:
            path = self.root / "base" / EMBEDDED_NAME
            if not (path / "model.safetensors").is_file():
                convert_embedded_model(path, log=log)
            return f"base-{EMBEDDED_NAME}", path
        if is_object_url(model.base):
            name = model.base.rstrip("/").rsplit("/", 1)[-1]
            path = self.root / "base" / f"{name}-{content_hash(model.base)[:8]}"
            if not (path / MANIFEST).is_file():
                log(f"downloading {model.base} into {path}")
                download_folder(model.base, path, MANIFEST)
            return f"base-{name}", path
        local = Path(model.base).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelNotFoundError(f"model.base={model.base!r} is a folder without config.json")
            return f"base-{local.name}", local.resolve()
        if model.base.startswith((".", "/", "~")) or model.base.count("/") > 1:
            raise ModelNotFoundError(f"model.base={model.base!r}: no such model directory")
        return f"base-{model.base.replace('/', '--')}", model.base  # a hub id

    # -- registry -------------------------------------------------------------------

    def _registry(self, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run ``work`` in one transaction on the registry; other processes wait for its lock meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        with connect_duckdb(self.registry_path, timeout_s=self.lock_timeout_s, advice=REGISTRY_ADVICE) as con:
            con.execute(_REGISTRY_SCHEMA)
            con.execute("BEGIN TRANSACTION")
            try:
                result = work(con)
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # the transaction is gone already; the original error is the one to see
                raise
            con.execute("COMMIT")
            return result

    def register(
        self,
        version_id: str,
        path: Path | str,
        *,
        parent_version: str | None,
        round_id: str | None,
        method: str,
        hyperparameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        promoted: bool = False,
    ) -> ModelVersion:
        row = [
            version_id,
            parent_version,
            round_id,
            method,
            str(path),
            json.dumps(hyperparameters or {}, default=str),
            json.dumps(metrics or {}, default=str),
            promoted,
            _now(),
        ]
        self._registry(
            lambda con: con.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        )
        return self.get(version_id)

    def add_metrics(self, version_id: str, metrics: dict[str, Any]) -> None:
        """Merge metrics (e.g. evaluation results) into a version's registry row."""

        def merge(con: duckdb.DuckDBPyConnection) -> None:
            row = con.execute("SELECT metrics FROM versions WHERE version_id = ?", [version_id]).fetchone()
            if row is None:
                raise ModelNotFoundError(f"model version {version_id!r} is not in the registry")
            merged = {**json.loads(row[0] or "{}"), **metrics}
            con.execute(
                "UPDATE versions SET metrics = ? WHERE version_id = ?", [json.dumps(merged, default=str), version_id]
            )

        self._registry(merge)

    def get(self, version_id: str) -> ModelVersion:
        row = self._registry(
            lambda con: con.execute(
                "SELECT version_id, path, parent_version, round, method, promoted, hyperparameters FROM versions "
                "WHERE version_id = ?",
                [version_id],
            ).fetchone()
        )
        if row is None:
            raise ModelNotFoundError(f"model version {version_id!r} is not in the registry {self.registry_path}")
        vid, path, parent, round_id, method, promoted, hyperparameters = row
        weights_from = json.loads(hyperparameters or "{}").get("weights_from")
        where = Path(path) if Path(path).exists() else path
        return ModelVersion(vid, where, parent, round_id, method, bool(promoted), weights_from)

    def versions(self) -> pd.DataFrame:
        return self._registry(lambda con: con.execute("SELECT * FROM versions ORDER BY created_at").df())

    def champion(self, model: ModelSettings, log: Callable[[str], None] = print) -> ModelVersion:
        """The newest promoted version; the configured base model is the first champion."""
        current = self._current_champion_id()
        if current is not None:
            return self.get(current)
        version_id, path = self.resolve_base(model, log=log)  # may download and convert: no lock held
        _check_model_config(path, model)  # never register a champion that cannot be loaded

        def register_first(con: duckdb.DuckDBPyConnection) -> str:
            # Checked again under the lock: a process started at the same moment may have registered it.
            current = _champion_id(con)
            if current is not None:
                return current
            con.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version_id, None, None, "base", str(path), "{}", "{}", True, _now()],
            )
            _promote(con, version_id, "promote", "configured base model")
            return version_id

        return self.get(self._registry(register_first))

    def record_promotion(self, version_id: str, action: str, reason: str) -> None:
        self._registry(lambda con: _promote(con, version_id, action, reason))

    def ancestors(self, version_id: str) -> list[ModelVersion]:
        """The version, its parent, grandparent, ... down to the base model."""
        chain = [self.get(version_id)]
        while chain[-1].parent_version is not None:
            chain.append(self.get(chain[-1].parent_version))
        return chain

    def rollback(self, reason: str, to_version: str | None = None) -> ModelVersion:
        """Make an earlier version champion again (default: the champion it was built on, :meth:`champion_before`)."""

        def roll_back(con: duckdb.DuckDBPyConnection) -> str:
            # One transaction: a promotion by a concurrent round cannot slip in between.
            current = _champion_id(con)
            if current is None:
                raise ModelNotFoundError("there is no champion to roll back")
            target = to_version or _champion_before(con, current)
            if target is None:
                raise ModelNotFoundError(f"{current} is a base model: nothing to roll back to")
            if con.execute("SELECT 1 FROM versions WHERE version_id = ?", [target]).fetchone() is None:
                raise ModelNotFoundError(f"model version {target!r} is not in the registry {self.registry_path}")
            _promote(con, current, "rollback", reason)
            _promote(con, target, "promote", f"rollback from {current}: {reason}")
            return target

        return self.get(self._registry(roll_back))

    def require_complete(self, version_id: str) -> ModelVersion:
        """The version, if its weights are there to load; ModelNotFoundError naming what is missing."""
        version = self.get(version_id)
        problem = checkpoint_problem(version)
        if problem:
            raise ModelNotFoundError(f"model version {version_id}: {problem}")
        return version

    def rollback_target(self, to_version: str | None = None) -> str:
        """The version a rollback would make champion: ``to_version``, else the champion it was built on."""
        current = self._current_champion_id()
        if current is None:
            raise ModelNotFoundError("there is no champion to roll back")
        target = to_version or self.champion_before(current)
        if target is None:
            raise ModelNotFoundError(f"{current} is a base model: nothing to roll back to")
        return target

    def export(self, version_id: str, destination: Path | str) -> Path | str:
        """Copy a version's merged weights and tokenizer into a folder transformers and vLLM load directly,
        or upload them under an object-store prefix (``s3://bucket/prefix``).

        The destination must be new, empty, or an earlier export's (whose files alone are replaced);
        see :mod:`tao_pipeline.registry.export`.
        """
        version = self.require_complete(version_id)
        if not isinstance(version.path, Path):
            raise ModelNotFoundError(f"{version_id} is a hub id ({version.path}); nothing local to export")
        files = [item for item in sorted(version.path.iterdir()) if item.is_file() and item.name not in _NOT_EXPORTED]
        if is_object_url(destination):
            return export_to_object_store(files, str(destination), version_id)
        return export_files(files, Path(destination), self.root.parent, version_id)

    def champion_before(self, version_id: str) -> str | None:
        """The nearest ancestor of ``version_id`` that has been champion: the model its round was gated
        against and the one a rollback returns to. Usually its parent; with ``flywheel.start_from =
        "challenger"`` the challengers in between, which never served, are skipped. None for a base model."""
        return self._registry(lambda con: _champion_before(con, version_id))

    def champion_id(self) -> str | None:
        """The champion's version id, or None before the first round (nothing registered yet)."""
        return self._current_champion_id()

    def _current_champion_id(self) -> str | None:
        return self._registry(_champion_id)

    def promotions(self) -> pd.DataFrame:
        return self._registry(lambda con: con.execute("SELECT * FROM promotions ORDER BY decided_at").df())

    # -- live experiments --------------------------------------------------------------

    def start_live(self, version_id: str, mode: str, share: float = 1.0) -> LiveExperiment:
        """Put ``version_id`` on live traffic beside the champion (replacing a running experiment)."""
        if mode not in LIVE_MODES:
            raise ValueError(f"live mode {mode!r}: expected one of {', '.join(LIVE_MODES)}")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"canary share {share}: give a fraction above 0 and at most 1, e.g. 0.1")
        self.require_complete(version_id)

        def start(con: duckdb.DuckDBPyConnection) -> None:
            champion = _champion_id(con)
            if champion is None:
                raise ModelNotFoundError("there is no champion yet: run a round (or `tao bootstrap`) first")
            if champion == version_id:
                raise ValueError(f"{version_id} is the champion already: nothing to compare it with")
            _end_live(con, "replaced", {"by": version_id, "mode": mode})
            con.execute(
                "INSERT INTO live_experiments VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)",
                [version_id, champion, mode, share if mode == "canary" else 1.0, _now()],
            )
            beside = f"{mode} beside {champion}" + (f", share {share}" if mode == "canary" else "")
            _promote(con, version_id, mode, beside)

        self._registry(start)
        return self.live_experiment()

    def live_experiment(self) -> LiveExperiment | None:
        """The experiment on live traffic now, or None."""
        return self._registry(_running_live)

    def end_live(self, outcome: str, evidence: dict[str, Any], promote: bool = False) -> LiveExperiment | None:
        """End the running experiment, recording why; ``promote`` makes its challenger champion in the same
        transaction, unless the champion changed meanwhile (then nothing is promoted). None if none ran."""

        def end(con: duckdb.DuckDBPyConnection) -> LiveExperiment | None:
            running = _running_live(con)
            if running is None:
                return None
            reason, recorded, applied = evidence.get("reason") or outcome, outcome, promote
            if promote and _champion_id(con) != running.champion_version:
                recorded, applied = f"{outcome}, not applied: the champion changed during the experiment", False
            _end_live(con, recorded, evidence)
            if applied:
                _promote(con, running.version_id, "promote", f"live evidence: {reason}")
            else:
                _promote(con, running.version_id, "live stop", f"{recorded}: {reason}")
            return running

        return self._registry(end)

    def advance_live(self, mode: str, share: float, evidence: dict[str, Any]) -> LiveExperiment | None:
        """The running experiment's challenger passed its stage: it goes on to ``mode`` beside the same
        champion, in one transaction. None if none ran; if the champion changed meanwhile, the experiment
        ends instead (its comparison no longer holds)."""
        if mode not in LIVE_MODES:
            raise ValueError(f"live mode {mode!r}: expected one of {', '.join(LIVE_MODES)}")

        def advance(con: duckdb.DuckDBPyConnection) -> LiveExperiment | None:
            running = _running_live(con)
            if running is None:
                return None
            reason = evidence.get("reason", "")
            if _champion_id(con) != running.champion_version:
                _end_live(con, f"passed {running.mode}, not applied: the champion changed", evidence)
                _promote(con, running.version_id, "live stop", f"the champion changed during its {running.mode}")
                return None
            _end_live(con, f"passed {running.mode}", evidence)
            stage_share = share if mode == "canary" else 1.0
            con.execute(
                "INSERT INTO live_experiments VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL)",
                [running.version_id, running.champion_version, mode, stage_share, _now()],
            )
            beside = f"{mode} beside {running.champion_version}" + (f", share {share}" if mode == "canary" else "")
            _promote(con, running.version_id, mode, f"passed {running.mode} ({reason}); {beside}")
            return _running_live(con)

        return self._registry(advance)

    def live_history(self) -> pd.DataFrame:
        return self._registry(lambda con: con.execute("SELECT * FROM live_experiments ORDER BY started_at").df())


def _check_model_config(path: Path | str, model: ModelSettings) -> None:
    """A base model is registered only if transformers can read its config (a local folder's config.json,
    or a hub id's from the local cache or the hub)."""
    from transformers import AutoConfig  # heavy; only when the first champion is registered

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        reason = " ".join(str(error).split())[:200]
        if isinstance(path, Path):
            raise ModelNotFoundError(f"model.base={model.base!r}: its config.json cannot be read ({reason})") from None
        raise ModelNotFoundError(
            f"model.base={path!r} is neither a local model folder nor a model the hub serves here ({reason})"
        ) from None


def checkpoint_problem(version: ModelVersion) -> str | None:
    """Why a version's weights cannot be loaded (a deleted or half-written folder), or None.

    A path the registry holds as absolute is a local folder; anything else is a hub id."""
    path = Path(version.path)
    if not path.is_absolute():
        return None
    if not path.is_dir():
        return f"its checkpoint folder {path} is missing (deleted or moved?)"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return f"its checkpoint folder {path} is incomplete (no config.json or no *.safetensors)"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"its config.json cannot be read ({' '.join(str(error).split())[:120]})"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    return None


def _champion_id(con: duckdb.DuckDBPyConnection) -> str | None:
    row = con.execute(
        "SELECT version_id FROM promotions WHERE action = 'promote' ORDER BY decided_at DESC LIMIT 1"
    ).fetchone()
    return row[0] if row else None


def _champion_before(con: duckdb.DuckDBPyConnection, version_id: str) -> str | None:
    parent_of = "SELECT parent_version FROM versions WHERE version_id = ?"
    served = "SELECT 1 FROM promotions WHERE version_id = ? AND action = 'promote' LIMIT 1"
    row = con.execute(parent_of, [version_id]).fetchone()
    ancestor, seen = (row[0] if row else None), {version_id}
    while ancestor is not None and ancestor not in seen:  # a hand-edited registry could hold a cycle
        if con.execute(served, [ancestor]).fetchone() is not None:
            return ancestor
        seen.add(ancestor)
        row = con.execute(parent_of, [ancestor]).fetchone()
        ancestor = row[0] if row else None
    return None


def _running_live(con: duckdb.DuckDBPyConnection) -> LiveExperiment | None:
    row = con.execute(
        "SELECT version_id, champion_version, mode, share, started_at FROM live_experiments "
        "WHERE ended_at IS NULL ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    return LiveExperiment(*row) if row else None


def _end_live(con: duckdb.DuckDBPyConnection, outcome: str, evidence: dict[str, Any]) -> None:
    con.execute(
        "UPDATE live_experiments SET ended_at = ?, outcome = ?, evidence = ? WHERE ended_at IS NULL",
        [_now(), outcome, json.dumps(evidence, default=str)],
    )


def _promote(con: duckdb.DuckDBPyConnection, version_id: str, action: str, reason: str) -> None:
    con.execute("INSERT INTO promotions VALUES (?, ?, ?, ?)", [version_id, action, reason, _now()])
    con.execute("UPDATE versions SET promoted = ? WHERE version_id = ?", [action == "promote", version_id])

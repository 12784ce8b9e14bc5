"""Which model a round starts from, and what a round's verdict does to the champion."""

from __future__ import annotations

import json
from collections.abc import Callable

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.registry.store import LiveExperiment, ModelStore, ModelVersion, checkpoint_problem
from tao_pipeline.settings import LiveSettings, ModelSettings

CANDIDATES_TABLE = "candidate_responses"


def round_starting_model(
    models: ModelStore,
    lake: Lake,
    round_id: str,
    model: ModelSettings,
    start_from: str = "champion",
    log: Callable[[str], None] = print,
) -> ModelVersion:
    """The model a round builds on: the one that wrote its candidates if it has any, so re-materializing
    a round keeps its starting model, else the champion of this moment; with ``start_from =
    "challenger"`` (flywheel.start_from) the newest challenger built on that champion that its gate did
    not find worse (:func:`unrefuted_challenger`), if there is one. The champion serves either way.
    With ``start_from = "base"`` the champion writes the candidates and training starts from the base
    model's weights (:func:`starting_weights`)."""
    if lake.exists(CANDIDATES_TABLE, round_id):
        return models.get(lake.read(CANDIDATES_TABLE, round_id)["model_version"].iloc[0])
    champion = models.champion(model, log=log)
    if start_from != "challenger":
        return champion
    challenger = unrefuted_challenger(models, champion.version_id)
    if challenger is None:
        return champion
    log(
        f"{round_id} tunes {challenger.version_id}, the newest challenger built on the champion {champion.version_id} "
        "that its gate did not find worse (flywheel.start_from = challenger); the champion goes on serving"
    )
    return challenger


def starting_weights(models: ModelStore, parent_version: str, start_from: str = "champion") -> ModelVersion:
    """The weights a round's training starts from: its parent's (the model that wrote its candidates), or with
    ``start_from = "base"`` the base model at the root of the parent's lineage, retrained each round on what
    the parent answered (every prompt so far with flywheel.replay_fraction = 1), so rounds accumulate traffic
    without stacking one round's drift on the last's."""
    if start_from == "base":
        return models.ancestors(parent_version)[-1]
    return models.get(parent_version)


def unrefuted_challenger(models: ModelStore, champion_id: str) -> ModelVersion | None:
    """The newest version tuned on top of ``champion_id`` (directly or through other such challengers)
    whose gate did not find it worse than that champion (its held-out win rate's interval reaches 0.5
    and, where labels gave accuracies, its accuracy is not lower), on which nothing was decided yet (no
    promotion, shadow or canary, rollback or rejection in the registry's log) and whose weights are all
    there. Rounds that start from it stack their small steps until one is proven better than the champion."""
    decided = set(models.promotions()["version_id"])
    for row in models.versions().iloc[::-1].itertuples():
        if row.round is None or pd.isna(row.round) or row.version_id in decided:
            continue
        metrics = json.loads(row.metrics or "{}")
        if metrics.get("heldout_champion") != champion_id or not _not_found_worse(metrics):
            continue  # gated against another champion (or never gated), or found worse
        if models.champion_before(row.version_id) != champion_id:
            continue  # built on another champion
        version = models.get(row.version_id)
        if checkpoint_problem(version) is None:
            return version
    return None


def _not_found_worse(metrics: dict) -> bool:
    """The gate's evidence does not show the challenger worse: no guard refused it (labeled accuracy, length),
    its win rate's interval reaches 0.5 (as a promotion needs the lower end above it, a refutation needs the
    upper end below), and where labels gave accuracies it is not less accurate."""
    win_rate, high = metrics.get("heldout_win_rate"), metrics.get("heldout_win_rate_high")
    if win_rate is None or metrics.get("heldout_evidence") in ("guard", "no outcomes"):
        return False  # never evaluated (its round failed before the gate), refused by a guard, or nothing judged
    if (high if high is not None else win_rate) < 0.5 - 1e-9:
        return False
    accuracy, champion_accuracy = metrics.get("heldout_accuracy"), metrics.get("parent_heldout_accuracy")
    return accuracy is None or champion_accuracy is None or accuracy >= champion_accuracy


def apply_verdict(
    models: ModelStore,
    model: ModelSettings,
    round_id: str,
    challenger: str,
    promote: bool,
    reason: str,
    *,
    champion_collapse: str | None = None,
    live: LiveSettings | None = None,
) -> ModelVersion:
    """Promote the round's challenger when its verdict says so; return the champion afterwards. With
    ``live.enabled`` a challenger that passed goes on live traffic instead (:func:`start_live_after_gate`),
    and the live decision promotes it or rolls it back later.

    A re-materialized round whose challenger is already champion records nothing twice, and a
    challenger whose verdict says no is never promoted, even when this is run by hand. Nor is one
    whose starting model collapsed (``champion_collapse``): a descendant of a collapsing model is no cure.
    """
    if champion_collapse:
        return roll_back_collapsed(models, model, round_id, models.champion_before(challenger), champion_collapse)
    if promote and live is not None and live.enabled:
        start_live_after_gate(models, model, challenger, live)
        return models.champion(model)
    if promote and models.champion(model).version_id != challenger:
        models.record_promotion(challenger, "promote", f"{round_id}: {reason}")
    return models.champion(model)


def roll_back_collapsed(
    models: ModelStore, model: ModelSettings, round_id: str, collapsed: str | None, alert: str
) -> ModelVersion:
    """evaluation.auto_rollback: the collapse guard fired on ``collapsed``, the champion ``round_id`` started
    from. If it is still champion, roll back to its parent with the alert as the reason; once only."""
    current = models.champion(model)
    if current.version_id == collapsed and current.parent_version is not None:
        return models.rollback(f"auto-rollback after {round_id}: {alert}")
    return current


def start_live_after_gate(
    models: ModelStore, model: ModelSettings, challenger: str, live: LiveSettings
) -> LiveExperiment | None:
    """Put a challenger that passed the offline gate on live traffic, once: a rerun of its round neither
    restarts an experiment that ended (it was promoted or rolled back on live evidence) nor one that runs.
    Returns the experiment running afterwards."""
    history = models.live_history()
    if (history["version_id"] == challenger).any() or models.champion(model).version_id == challenger:
        return models.live_experiment()
    return models.start_live(challenger, live.stages[0], live.share)


def live_status(models: ModelStore, version_id: str, history: pd.DataFrame | None = None) -> str:
    """One line on a version's time on live traffic: running, how it ended, or never (``history``: the
    registry's ``live_history()``, when the caller has read it already)."""
    history = models.live_history() if history is None else history
    mine = history[history["version_id"] == version_id]
    if mine.empty:
        return "no"
    last = mine.iloc[-1]
    share = f", share {last['share']:.2f}" if last["mode"] == "canary" else ""
    since = f"{last['mode']} beside {last['champion_version']}{share} since {last['started_at']:%Y-%m-%d %H:%M:%S}"
    if pd.isna(last["ended_at"]):
        return f"{since} UTC; the live decision promotes it or rolls it back"
    return f"{since} UTC, ended {last['ended_at']:%H:%M:%S}: {last['outcome']}"

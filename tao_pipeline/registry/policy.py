"""Which model a round starts from, and what a round's verdict does to the champion."""

from __future__ import annotations

from collections.abc import Callable

from tao_pipeline.data.lake import Lake
from tao_pipeline.registry.store import ModelStore, ModelVersion
from tao_pipeline.settings import ModelSettings

CANDIDATES_TABLE = "candidate_responses"


def round_starting_model(
    models: ModelStore, lake: Lake, round_id: str, model: ModelSettings, log: Callable[[str], None] = print
) -> ModelVersion:
    """The model a round tunes: the one that wrote its candidates if it has any, so re-materializing
    a round keeps its starting model, else the champion of this moment."""
    if lake.exists(CANDIDATES_TABLE, round_id):
        return models.get(lake.read(CANDIDATES_TABLE, round_id)["model_version"].iloc[0])
    return models.champion(model, log=log)


def apply_verdict(
    models: ModelStore,
    model: ModelSettings,
    round_id: str,
    challenger: str,
    promote: bool,
    reason: str,
    *,
    champion_collapse: str | None = None,
) -> ModelVersion:
    """Promote the round's challenger when its verdict says so; return the champion afterwards.

    A re-materialized round whose challenger is already champion records nothing twice, and a
    challenger whose verdict says no is never promoted, even when this is run by hand. Nor is one
    whose starting model collapsed (``champion_collapse``): a descendant of a collapsing model is no cure.
    """
    if champion_collapse:
        return roll_back_collapsed(models, model, round_id, models.get(challenger).parent_version, champion_collapse)
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

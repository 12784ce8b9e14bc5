"""A round's evaluation, end to end: the held-out comparison, its verdict, the plots and the report.

:func:`evaluate_round` is what the ``checkpoint_evaluation`` asset calls: it finds the models
to compare (the round's starting model, its tuned checkpoint, the base model at the root of the
lineage and the control arm), evaluates them on the held-out prompts, and reviews the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tao_pipeline.data.answers import feedback_rates
from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation.evaluate import Contender, evaluate
from tao_pipeline.evaluation.history import EVALUATION_TABLE, champion_collapse, collapse_alerts, round_history
from tao_pipeline.evaluation.labels import load_labels
from tao_pipeline.evaluation.plots import round_plots
from tao_pipeline.evaluation.pooling import HeldoutPool, heldout_prompts
from tao_pipeline.evaluation.report import write_round_report
from tao_pipeline.evaluation.verdict import (
    VERDICTS_TABLE,
    ControlVerdict,
    RoundVerdict,
    Verdict,
    compare_control,
    decide,
)
from tao_pipeline.registry.policy import roll_back_collapsed
from tao_pipeline.registry.store import ModelStore, ModelVersion
from tao_pipeline.scoring import build_scorer
from tao_pipeline.settings import TaoSettings


@dataclass
class RoundReview:
    """What a round's evaluation concludes, and where its report was written."""

    verdict: Verdict
    control: ControlVerdict
    history: pd.DataFrame  # every evaluated round so far, this one included
    alerts: list[str]  # the collapse guard's
    plots: dict[str, bytes]
    report: Path
    champion_collapse: str | None = None  # the alert that implicates this round's starting model
    cautions: list[str] = field(default_factory=list)  # said beside the verdict; they change nothing

    @property
    def warnings(self) -> list[str]:
        return ([self.control.message] if self.control.alarm else []) + self.alerts

    def round_verdict(self, round_id: str, champion: str, challenger: str) -> RoundVerdict:
        return RoundVerdict(
            round_id,
            champion,
            challenger,
            self.verdict,
            self.control,
            self.alerts,
            len(self.history),
            self.champion_collapse or "",
        )


@dataclass
class RoundEvaluation:
    rows: pd.DataFrame  # one per held-out prompt
    review: RoundReview
    verdict: RoundVerdict  # stored beside the rows; what the promotion check and `champion` act on
    heldout: HeldoutPool | None = None  # the prompts it was evaluated on: its own, and earlier rounds' pooled
    cautions: list[str] = field(default_factory=list)  # said beside the verdict; they change nothing

    @property
    def warnings(self) -> list[str]:
        return self.verdict.warnings + self.cautions


def unguarded_promotion(verdict: Verdict, starting_model: ModelVersion) -> str | None:
    """The caution for a challenger promoted on the label-free vote alone after tuning an already tuned model.

    bench/rounds.py (README, "Do rounds compound?") found the vote between a model tuned on its own votes and
    the champion passing challengers whose labeled accuracy was lower: its samples agree with each other more
    without being right more often. Only the accuracy guard refused them, and it needs labeled held-out prompts.
    """
    if not verdict.promote or verdict.challenger_accuracy is not None or starting_model.parent_version is None:
        return None
    return (
        f"promoted on the label-free vote alone, tuned from {starting_model.version_id}, itself a tuned model: "
        "no labeled held-out prompt checked its accuracy. From tuned models the vote has favoured less accurate "
        "challengers (README, 'Do rounds compound?'); a few labeled prompts (data.labels) let the accuracy guard "
        "refuse them"
    )


def review_round(
    lake: Lake, round_id: str, rows: pd.DataFrame, settings: TaoSettings, starting_model: ModelVersion | None = None
) -> RoundReview:
    """Judge a round from its evaluation rows: promotion verdict, control arm, collapse guard across
    rounds (this one's rows replace any the lake holds for it), plots, and ``<reports>/<round>/report.md``;
    with the model the round tuned (``starting_model``), the cautions its verdict calls for."""
    verdict, control = decide(rows, settings.evaluation), compare_control(rows, settings.evaluation)
    caution = unguarded_promotion(verdict, starting_model) if starting_model is not None else None
    cautions = [caution] if caution else []
    history = round_history(lake, current=(round_id, rows))
    alerts = collapse_alerts(history)
    plots = round_plots(lake, round_id, rows, history)
    feedback = feedback_rates(lake)
    report = write_round_report(
        settings.reports_dir / round_id, round_id, rows, verdict, control, history, alerts, plots, feedback, cautions
    )
    collapse = champion_collapse(history, round_id)
    return RoundReview(verdict, control, history, alerts, plots, report, collapse, cautions)


def evaluate_round(
    lake: Lake,
    models: ModelStore,
    round_id: str,
    prompts: pd.DataFrame,
    tuned: Mapping[str, Any],
    control: Mapping[str, Any] | None,
    settings: TaoSettings,
    progress: bool = True,
) -> RoundEvaluation:
    """The tuned checkpoint (a tuned_checkpoint row) against the champion it was built on on the round's
    held-out ``prompts`` (pooled with every earlier round's, evaluation.pool_heldout), with the
    base model's test-time baselines and the control arm (a control_checkpoint row, if enabled)."""
    pool = heldout_prompts(
        lake, round_id, prompts, settings.data,
        pool=settings.evaluation.pool_heldout, limit=settings.evaluation.max_heldout_prompts,
    )  # fmt: skip
    # The champion the challenger was built on: its parent, or further back past unpromoted challengers
    # (flywheel.start_from = "challenger"); the gate compares with a model that served.
    parent = models.get(models.champion_before(tuned["version_id"]) or tuned["parent_version"])
    base = models.ancestors(parent.version_id)[-1]
    rows = evaluate(
        pool.prompts,
        Contender(parent.version_id, parent.path),
        Contender(tuned["version_id"], tuned["path"]),
        build_scorer(settings.scoring, settings.cache_dir),
        load_labels(settings.data.labels),
        settings,
        progress,
        base=Contender(base.version_id, base.path),
        control=Contender(control["version_id"], control["path"])
        if control is not None and control["enabled"]
        else None,
    )
    tuned_from = models.get(models.get(tuned["version_id"]).tuned_from)
    review = review_round(lake, round_id, rows, settings, starting_model=tuned_from)
    verdict = review.round_verdict(round_id, parent.version_id, tuned["version_id"])
    return RoundEvaluation(rows, review, verdict, pool, review.cautions)


def store_evaluation(lake: Lake, models: ModelStore, evaluated: RoundEvaluation, settings: TaoSettings):
    """Write the round's rows and verdict, record the challenger's metrics, and apply the collapse brake
    (evaluation.auto_rollback) here, where the alert is found: the promotion gate may hold back `champion`.

    Returns the rows' path and the champion after a rollback (None when none happened).
    """
    verdict = evaluated.verdict
    path = lake.write(EVALUATION_TABLE, verdict.round, evaluated.rows.assign(round=verdict.round))
    lake.write(VERDICTS_TABLE, verdict.round, verdict.to_frame())
    models.add_metrics(verdict.challenger_version, verdict.registry_metrics())
    if not (settings.evaluation.auto_rollback and verdict.champion_collapse):
        return path, None
    before = models.champion(settings.model).version_id
    after = roll_back_collapsed(
        models, settings.model, verdict.round, verdict.champion_version, verdict.champion_collapse
    )
    return path, (after if after.version_id != before else None)

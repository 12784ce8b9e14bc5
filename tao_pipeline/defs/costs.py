"""What a stage cost, recorded in the lake and shown in its metadata; the round's total, after its evaluation."""

from __future__ import annotations

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.stage_costs import StageCost, record_stage_cost
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.evaluation import RoundEvaluation
from tao_pipeline.evaluation.round_cost import add_cost_section, round_cost
from tao_pipeline.registry.store import ModelStore
from tao_pipeline.settings import CostSettings, TaoSettings


def stage_cost(lake: Lake, round_id: str, stage: str, meter: StageMeter, prices: CostSettings) -> dict:
    """Record the stage's cost for the round; its figures as metadata (``cost_*``)."""
    cost = StageCost.measured(stage, meter)
    record_stage_cost(lake, round_id, cost)
    metadata = {f"cost_{name}": round(value, 1) for name, value in cost.figures().items()}
    money = cost.money(prices)
    return metadata if money is None else {**metadata, "cost_money": f"{money:.4f} {prices.currency}"}


def evaluation_and_round_cost(
    lake: Lake, models: ModelStore, evaluated: RoundEvaluation, meter: StageMeter, settings: TaoSettings
) -> dict:
    """The evaluation's own cost, then the round's: in the report, on the challenger in the registry, as metadata."""
    round_id = evaluated.verdict.round
    metadata = stage_cost(lake, round_id, "checkpoint_evaluation", meter, settings.costs)
    cost = round_cost(lake, round_id, evaluated.verdict.promotion, settings.costs)
    add_cost_section(evaluated.review.report, cost)
    models.add_metrics(evaluated.verdict.challenger_version, cost.registry_metrics())
    return {
        **metadata,
        "round_cost": md_table(cost.table(), rows=20),
        "round_gain": f"{cost.gain.describe()} ({cost.gain.detail})",
        "cost_per_point_of_gain": cost.per_point_text(),
    }

"""Stage 6: the challenger against the champion on held-out prompts; the verdict is stored with the rows."""

from pathlib import Path

import dagster as dg

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.defs.constants import HEAVY_POOL
from tao_pipeline.defs.costs import evaluation_and_round_cost
from tao_pipeline.defs.metadata import md_table, plot
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.evaluation import RoundEvaluation, evaluate_round, summarize, tuned_vs_sampling_table
from tao_pipeline.evaluation.review import store_evaluation


@dg.asset(**ROUND_STAGE, deps=["tuned_checkpoint", "control_checkpoint"], kinds={"pytorch", "parquet"}, pool=HEAVY_POOL)
def checkpoint_evaluation(
    context: dg.AssetExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Held-out evaluation: win rate, labeled accuracy, base maj@k/best-of-k, the control; writes the round report."""
    config, store, round_id, models = settings.get(), lake.get(), context.partition_key, model_store.get()
    prompts = store.read("raw_prompts", round_id)
    tuned = store.read("tuned_checkpoint", round_id).iloc[0]
    control = store.read("control_checkpoint", round_id).iloc[0]
    with StageMeter() as memory:
        evaluated = evaluate_round(store, models, round_id, prompts, tuned, control, config)
    path, rolled_back = store_evaluation(store, models, evaluated, config)
    for warning in evaluated.warnings + ([f"auto-rollback: champion is {rolled_back}"] if rolled_back else []):
        context.log.warning(warning)
    cost = evaluation_and_round_cost(store, models, evaluated, memory, config)
    metadata = {**_verdict(evaluated), **memory.metadata(), **cost, **_tables(evaluated, path)}
    return dg.MaterializeResult(metadata=metadata)


def _verdict(evaluated: RoundEvaluation) -> dict:
    verdict = evaluated.verdict
    promotion = verdict.promotion
    return {
        "heldout_prompts": len(evaluated.rows),
        "heldout_pool": evaluated.heldout.describe() if evaluated.heldout else "this round's own",
        "wins_losses_ties": f"{promotion.wins} / {promotion.losses} / {promotion.ties}",
        "win_rate": round(promotion.win_rate, 3),
        "win_rate_interval": f"{promotion.win_rate_interval} at {promotion.win_rate_interval.percent}",
        "sign_test_p": promotion.sign_test_p,
        "champion_accuracy": promotion.champion_accuracy,
        "challenger_accuracy": promotion.challenger_accuracy,
        "accuracy_difference_interval": _interval(
            promotion.accuracy_difference_low, promotion.accuracy_difference_high
        ),
        "mcnemar_p": promotion.mcnemar_p,
        "evidence": promotion.evidence,
        "heldout_needed": promotion.heldout_needed,
        "verdict": ("promote: " if promotion.promote else "keep champion: ") + promotion.reason,
        "control_arm": verdict.control.message,
        "collapse_guard": "; ".join(verdict.collapse_alerts) or "ok: no round where reward rose while accuracy fell",
    }


def _interval(low: float | None, high: float | None) -> str | None:
    return None if low is None else f"[{low:+.3f}, {high:+.3f}]"


def _tables(evaluated: RoundEvaluation, path: Path) -> dict:
    rows, review = evaluated.rows, evaluated.review
    confidence = evaluated.verdict.promotion.confidence
    return {
        "before_after": md_table(summarize(rows, confidence), rows=50),
        "test_time_compute": md_table(tuned_vs_sampling_table(rows, confidence), rows=20),
        **{name: plot(png) for name, png in review.plots.items()},
        "rounds": md_table(review.history, rows=50),
        "examples": md_table(rows[["task", "prompt", "champion_response", "challenger_response", "outcome"]]),
        "report": dg.MetadataValue.path(str(review.report)),
        "path": dg.MetadataValue.path(str(path)),
    }

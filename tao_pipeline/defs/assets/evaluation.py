"""Stage 6: the challenger against the champion on held-out prompts; the verdict is stored with the rows."""

from pathlib import Path

import dagster as dg

from tao_pipeline.common.profiling import PeakMemory
from tao_pipeline.defs.constants import HEAVY_POOL
from tao_pipeline.defs.metadata import md_table, plot
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.evaluation import VERDICTS_TABLE, RoundEvaluation, evaluate_round, summarize, tuned_vs_sampling_table


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
    with PeakMemory() as memory:
        evaluated = evaluate_round(
            store, models, round_id, prompts[prompts["split"] == "heldout"], tuned, control, config
        )
    path = store.write("checkpoint_evaluation", round_id, evaluated.rows.assign(round=round_id))
    store.write(VERDICTS_TABLE, round_id, evaluated.verdict.to_frame())
    models.add_metrics(evaluated.verdict.challenger_version, evaluated.verdict.registry_metrics())
    for warning in evaluated.verdict.warnings:
        context.log.warning(warning)
    return dg.MaterializeResult(metadata={**_verdict(evaluated), **memory.metadata(), **_tables(evaluated, path)})


def _verdict(evaluated: RoundEvaluation) -> dict:
    verdict = evaluated.verdict
    promotion = verdict.promotion
    return {
        "heldout_prompts": len(evaluated.rows),
        "win_rate": round(promotion.win_rate, 3),
        "champion_accuracy": promotion.champion_accuracy,
        "challenger_accuracy": promotion.challenger_accuracy,
        "verdict": ("promote: " if promotion.promote else "keep champion: ") + promotion.reason,
        "control_arm": verdict.control.message,
        "collapse_guard": "; ".join(verdict.collapse_alerts) or "ok: no round where reward rose while accuracy fell",
    }


def _tables(evaluated: RoundEvaluation, path: Path) -> dict:
    rows, review = evaluated.rows, evaluated.review
    return {
        "before_after": md_table(summarize(rows), rows=50),
        "test_time_compute": md_table(tuned_vs_sampling_table(rows), rows=20),
        **{name: plot(png) for name, png in review.plots.items()},
        "rounds": md_table(review.history, rows=50),
        "examples": md_table(rows[["task", "prompt", "champion_response", "challenger_response", "outcome"]]),
        "report": dg.MetadataValue.path(str(review.report)),
        "path": dg.MetadataValue.path(str(path)),
    }

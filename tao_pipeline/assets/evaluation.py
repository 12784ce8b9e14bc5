"""Stage 6 and the promotion: challenger vs champion on held-out prompts; promote only winners."""

import dagster as dg

from tao_pipeline.assets.generation import HEAVY_POOL
from tao_pipeline.assets.metadata import md_table, plot
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.evaluation import Contender, decide, evaluate, summarize, tuned_vs_sampling_table
from tao_pipeline.profiling import PeakMemory
from tao_pipeline.prompts import load_labels
from tao_pipeline.reporting import review_round
from tao_pipeline.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.scoring import build_scorer


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", deps=["tuned_checkpoint", "control_checkpoint"],
          kinds={"pytorch", "parquet"}, pool=HEAVY_POOL)
def checkpoint_evaluation(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Held-out evaluation: win rate, labeled accuracy, base maj@k/best-of-k, the control; writes the round report."""
    config = settings.get()
    store, round_id = lake.get(), context.partition_key
    prompts = store.read("raw_prompts", round_id)
    checkpoint = store.read("tuned_checkpoint", round_id).iloc[0]
    control = store.read("control_checkpoint", round_id).iloc[0] if store.exists("control_checkpoint", round_id) \
        else None
    models = model_store.get()
    parent = models.get(checkpoint["parent_version"])
    base = models.ancestors(parent.version_id)[-1]
    with PeakMemory() as memory:
        rows = evaluate(
            prompts[prompts["split"] == "heldout"],
            Contender(parent.version_id, parent.path), Contender(checkpoint["version_id"], checkpoint["path"]),
            build_scorer(config.scoring, config.cache_dir), load_labels(config.data.labels), config,
            base=Contender(base.version_id, base.path),
            control=Contender(control["version_id"], control["path"]) if control is not None and control["enabled"]
            else None,
        )
    path = store.write("checkpoint_evaluation", round_id, rows.assign(round=round_id))
    review = review_round(store, round_id, rows, config)
    for warning in review.warnings:
        context.log.warning(warning)
    verdict = review.verdict
    models.add_metrics(checkpoint["version_id"], {
        "heldout_win_rate": verdict.win_rate, "heldout_accuracy": verdict.challenger_accuracy,
        "parent_heldout_accuracy": verdict.champion_accuracy,
    })
    return dg.MaterializeResult(metadata={
        "heldout_prompts": len(rows),
        "win_rate": round(verdict.win_rate, 3),
        "champion_accuracy": verdict.champion_accuracy,
        "challenger_accuracy": verdict.challenger_accuracy,
        "verdict": ("promote: " if verdict.promote else "keep champion: ") + verdict.reason,
        "control_arm": review.control.message,
        "collapse_guard": "; ".join(review.alerts) or "ok: no round where reward rose while accuracy fell",
        **memory.metadata(),
        "before_after": md_table(summarize(rows), rows=50),
        "test_time_compute": md_table(tuned_vs_sampling_table(rows), rows=20),
        **{name: plot(png) for name, png in review.plots.items()},
        "rounds": md_table(review.history, rows=50),
        "examples": md_table(rows[["task", "prompt", "champion_response", "challenger_response", "outcome"]]),
        "report": dg.MetadataValue.path(str(review.report)),
        "path": dg.MetadataValue.path(str(path)),
    })


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", deps=["checkpoint_evaluation"],
          kinds={"duckdb"})
def champion(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Promote the round's challenger in the registry; runs only when the promotion check passed."""
    config = settings.get()
    store, round_id = lake.get(), context.partition_key
    rows = store.read("checkpoint_evaluation", round_id)
    challenger = store.read("tuned_checkpoint", round_id)["version_id"].iloc[0]
    verdict = decide(rows, config.evaluation)
    models = model_store.get()
    # The blocking check challenger_beats_champion already gated this asset; re-checking keeps a
    # hand-started materialization from promoting a loser.
    already_champion = models.champion(config.model).version_id == challenger  # re-materialized round
    if verdict.promote and not already_champion:
        models.record_promotion(challenger, "promote", f"{round_id}: {verdict.reason}")
    current = models.champion(config.model)
    context.log.info(f"champion after {round_id}: {current.version_id} ({verdict.reason})")
    return dg.MaterializeResult(metadata={
        "champion": current.version_id,
        "promoted": verdict.promote,
        "reason": verdict.reason,
        "champion_path": dg.MetadataValue.path(str(current.path)),
    })

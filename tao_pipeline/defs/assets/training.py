"""Stage 5: DPO (or GRPO) on what the model that wrote the candidates answered, from its weights (or the base
model's: flywheel.start_from); and the control arm."""

import dagster as dg
import pandas as pd

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.defs.constants import HEAVY_POOL
from tao_pipeline.defs.costs import stage_cost
from tao_pipeline.defs.metadata import md_table, plot, sparkline
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.evaluation.plots import training_curves_plot
from tao_pipeline.training import RoundCheckpoint, TrainingResult, control_round, tune_round


@dg.asset(**ROUND_STAGE, deps=["preference_pairs"], kinds={"pytorch", "huggingface", "safetensors"}, pool=HEAVY_POOL)
def tuned_checkpoint(
    context: dg.AssetExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Tune the round's starting model with TRL (DPO on the pairs by default, or GRPO); register the checkpoint."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    pairs = store.read("preference_pairs", round_id)
    prompts = store.read("raw_prompts", round_id)
    parent_version = store.read("candidate_responses", round_id)["model_version"].iloc[0]
    with StageMeter() as meter:
        tuned = tune_round(
            model_store.get(), parent_version, pairs, prompts[prompts["split"] == "train"], config, round_id
        )
    store.write("tuned_checkpoint", round_id, tuned.record)
    cost = stage_cost(store, round_id, "tuned_checkpoint", meter, config.costs)
    grpo = config.training.method == "grpo"
    metadata = _metadata(tuned, ["version_id", "parent_version", "weights_from", "method"], meter, grpo)
    return dg.MaterializeResult(metadata={**metadata, **cost})


@dg.asset(**ROUND_STAGE, deps=["preference_pairs"], kinds={"pytorch", "safetensors"}, pool=HEAVY_POOL)
def control_checkpoint(
    context: dg.AssetExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """The control arm (evaluation.control_arm, off by default): the same DPO run with random preference
    directions. If it gains as much as the tuned model, the gain did not come from the scorer's signal."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    pairs = store.read("preference_pairs", round_id)
    parent_version = store.read("candidate_responses", round_id)["model_version"].iloc[0]
    with StageMeter() as meter:
        control = control_round(model_store.get(), parent_version, pairs, config, round_id)
    store.write("control_checkpoint", round_id, control.record)
    cost = stage_cost(store, round_id, "control_checkpoint", meter, config.costs)
    if control.result is None:
        hint = "set evaluation.control_arm=true to train it"
        return dg.MaterializeResult(metadata={"enabled": False, "hint": hint, **cost})
    metadata = _metadata(control, ["version_id", "parent_version", "weights_from"], meter, grpo=False)
    return dg.MaterializeResult(metadata={"enabled": True, **metadata, **cost})


def _metadata(checkpoint: RoundCheckpoint, columns: list[str], meter: StageMeter, grpo: bool) -> dict:
    return {
        **_summary(checkpoint, columns),
        **checkpoint.result.metrics(),
        **meter.metadata(),
        **_curves(checkpoint.result, grpo),
        **_checkpoint(checkpoint),
    }


def _summary(checkpoint: RoundCheckpoint, columns: list[str]) -> dict:
    row = checkpoint.record.iloc[0]
    return {**{column: row[column] for column in columns}, "trained_on": checkpoint.trained_on}


def _checkpoint(checkpoint: RoundCheckpoint) -> dict:
    return {"checkpoint": dg.MetadataValue.path(str(checkpoint.record["path"].iloc[0]))}


def _curves(result: TrainingResult, grpo: bool) -> dict:
    margin_key = "reward" if grpo else "rewards/margins"
    return {
        "loss_curve": sparkline(result.series("loss")),
        "reward_curve" if grpo else "reward_margin_curve": sparkline(result.series(margin_key)),
        "training_curves": plot(training_curves_plot(result.log_history)),
        "training_log": md_table(_history_table(result.log_history), rows=50),
    }


def _history_table(history: list[dict]) -> pd.DataFrame:
    columns = ["step", "loss", "rewards/margins", "rewards/accuracies", "learning_rate"]
    frame = pd.DataFrame(history)
    return frame[[c for c in columns if c in frame.columns]].round(4)

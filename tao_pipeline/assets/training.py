"""Stage 5: DPO on the round's pairs, starting from the model that wrote the candidates; and the control arm."""

import json

import dagster as dg
import pandas as pd

from tao_pipeline.assets.generation import HEAVY_POOL
from tao_pipeline.assets.metadata import md_table, plot, sparkline
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.profiling import PeakMemory
from tao_pipeline.reporting import training_curves_plot
from tao_pipeline.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.training import TrainingResult, train_control, tune_checkpoint

CONTROL_COLUMNS = ["round", "enabled", "version_id", "parent_version", "path", "log_history"]


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", deps=["preference_pairs"],
          kinds={"pytorch", "huggingface", "safetensors"}, pool=HEAVY_POOL)
def tuned_checkpoint(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Tune the round's starting model with TRL (DPO on the pairs by default, or GRPO); register the checkpoint."""
    config = settings.get()
    store, round_id = lake.get(), context.partition_key
    pairs = store.read("preference_pairs", round_id)
    prompts = store.read("raw_prompts", round_id)
    train_prompts = prompts[prompts["split"] == "train"]
    parent_version = store.read("candidate_responses", round_id)["model_version"].iloc[0]
    models = model_store.get()
    grpo = config.training.method == "grpo"
    with PeakMemory() as memory:
        version, result = tune_checkpoint(models, models.get(parent_version), pairs, config, round_id,
                                          prompts=train_prompts if grpo else None)
    # DPO learns from the pairs; GRPO from the prompts directly, with the round's scorer as reward.
    record = {"version_id": version.version_id, "parent_version": parent_version, "round": round_id,
              "method": version.method, "path": str(version.path),
              "pair_ids": [] if grpo else pairs["pair_id"].tolist(),
              "prompt_ids": train_prompts["prompt_id"].tolist() if grpo else pairs["prompt_id"].tolist(),
              "log_history": json.dumps(result.log_history), **result.metrics()}
    store.write("tuned_checkpoint", round_id, pd.DataFrame([record]))
    return dg.MaterializeResult(metadata={
        "version_id": version.version_id,
        "parent_version": parent_version,
        "method": version.method,
        "trained_on": f"{len(train_prompts)} prompts (GRPO)" if grpo else f"{len(pairs)} pairs (DPO)",
        **result.metrics(),
        **memory.metadata(),
        **_curves(result, grpo),
        "checkpoint": dg.MetadataValue.path(str(version.path)),
    })


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", deps=["preference_pairs"],
          kinds={"pytorch", "safetensors"}, pool=HEAVY_POOL)
def control_checkpoint(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """The control arm (evaluation.control_arm): the same DPO run with random preference directions.

    If this model gains as much as the tuned one, the gain did not come from the scorer's signal.
    Off by default; then this step only records that it was off.
    """
    config = settings.get()
    store, round_id = lake.get(), context.partition_key
    if not config.evaluation.control_arm:
        store.write("control_checkpoint", round_id, pd.DataFrame([{
            "round": round_id, "enabled": False, "version_id": None, "parent_version": None, "path": None,
            "log_history": "[]"}], columns=CONTROL_COLUMNS))
        return dg.MaterializeResult(metadata={"enabled": False, "hint": "set evaluation.control_arm=true to train it"})
    pairs = store.read("preference_pairs", round_id)
    parent_version = store.read("candidate_responses", round_id)["model_version"].iloc[0]
    with PeakMemory() as memory:
        version_id, path, result = train_control(model_store.get().get(parent_version), pairs, config, round_id)
    store.write("control_checkpoint", round_id, pd.DataFrame([{
        "round": round_id, "enabled": True, "version_id": version_id, "parent_version": parent_version,
        "path": str(path), "log_history": json.dumps(result.log_history)}], columns=CONTROL_COLUMNS))
    return dg.MaterializeResult(metadata={
        "enabled": True, "version_id": version_id, "parent_version": parent_version,
        "trained_on": f"{len(pairs)} pairs, each direction flipped with probability 1/2",
        **result.metrics(), **memory.metadata(), **_curves(result, grpo=False),
        "checkpoint": dg.MetadataValue.path(str(path)),
    })


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

"""Stage 5: DPO on the round's pairs, starting from the model that wrote the candidates."""

import dagster as dg
import pandas as pd

from tao_pipeline.assets.generation import HEAVY_POOL
from tao_pipeline.assets.metadata import md_table, sparkline
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.training import tune_checkpoint


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
    version, result = tune_checkpoint(models, models.get(parent_version), pairs, config, round_id,
                                      prompts=train_prompts if grpo else None)
    # DPO learns from the pairs; GRPO from the prompts directly, with the round's scorer as reward.
    record = {"version_id": version.version_id, "parent_version": parent_version, "round": round_id,
              "method": version.method, "path": str(version.path),
              "pair_ids": [] if grpo else pairs["pair_id"].tolist(),
              "prompt_ids": train_prompts["prompt_id"].tolist() if grpo else pairs["prompt_id"].tolist(),
              **result.metrics()}
    store.write("tuned_checkpoint", round_id, pd.DataFrame([record]))
    losses = result.series("loss")
    margins = result.series("reward" if grpo else "rewards/margins")
    return dg.MaterializeResult(metadata={
        "version_id": version.version_id,
        "parent_version": parent_version,
        "method": version.method,
        "trained_on": f"{len(train_prompts)} prompts (GRPO)" if grpo else f"{len(pairs)} pairs (DPO)",
        **result.metrics(),
        "loss_curve": sparkline(losses),
        "reward_curve" if grpo else "reward_margin_curve": sparkline(margins),
        "training_log": md_table(_history_table(result.log_history), rows=50),
        "checkpoint": dg.MetadataValue.path(str(version.path)),
    })


def _history_table(history: list[dict]) -> pd.DataFrame:
    columns = ["step", "loss", "rewards/margins", "rewards/accuracies", "learning_rate"]
    frame = pd.DataFrame(history)
    return frame[[c for c in columns if c in frame.columns]].round(4)

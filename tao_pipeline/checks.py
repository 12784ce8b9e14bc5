"""The promotion gate: a blocking check on the evaluation; the champion asset runs only if it passes."""

import dagster as dg

from tao_pipeline.assets.evaluation import checkpoint_evaluation
from tao_pipeline.evaluation import decide
from tao_pipeline.resources import LakeResource, TaoSettingsResource


@dg.asset_check(asset=checkpoint_evaluation, blocking=True,
                description="The challenger beats the champion on held-out prompts and no guard regresses.")
def challenger_beats_champion(
    context: dg.AssetCheckExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
) -> dg.AssetCheckResult:
    config = settings.get()
    rows = lake.get().read("checkpoint_evaluation", _partition(context))
    verdict = decide(rows, config.evaluation)
    return dg.AssetCheckResult(
        passed=verdict.promote, description=verdict.reason,
        metadata={"win_rate": verdict.win_rate, "champion_accuracy": verdict.champion_accuracy,
                  "challenger_accuracy": verdict.challenger_accuracy, "length_ratio": verdict.length_ratio},
    )


def _partition(context: dg.AssetCheckExecutionContext) -> str:
    return context.run.tags["dagster/partition"]

"""Checks on the evaluation: the blocking promotion gate, and two warnings that evaluation can't fool us."""

import dagster as dg

from tao_pipeline.assets.evaluation import checkpoint_evaluation
from tao_pipeline.evaluation import compare_control, decide
from tao_pipeline.reporting import collapse_alerts, round_history
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


@dg.asset_check(asset=checkpoint_evaluation,
                description="The tuned model gains more than the control arm trained on random preference directions.")
def tao_beats_control(
    context: dg.AssetCheckExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
) -> dg.AssetCheckResult:
    rows = lake.get().read("checkpoint_evaluation", _partition(context))
    control = compare_control(rows, settings.get().evaluation)
    return dg.AssetCheckResult(
        passed=not control.alarm, severity=dg.AssetCheckSeverity.WARN, description=control.message,
        metadata={"enabled": control.enabled, "measure": control.measure, "tao_gain": control.tao_gain,
                  "control_gain": control.control_gain},
    )


@dg.asset_check(asset=checkpoint_evaluation,
                description="Collapse guard: no round where the scorer's reward rose while held-out accuracy fell.")
def reward_tracks_accuracy(
    context: dg.AssetCheckExecutionContext, lake: LakeResource,
) -> dg.AssetCheckResult:
    history = round_history(lake.get())
    alerts = collapse_alerts(history)
    return dg.AssetCheckResult(
        passed=not alerts, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(alerts) or "reward and held-out accuracy moved together in every round",
        metadata={"rounds": len(history), "alerts": len(alerts)},
    )


EVALUATION_CHECKS = [challenger_beats_champion, tao_beats_control, reward_tracks_accuracy]


def _partition(context: dg.AssetCheckExecutionContext) -> str:
    return context.run.tags["dagster/partition"]

"""Checks on the evaluation: the blocking promotion gate, and two warnings that evaluation can't fool us.

Each reads the verdict stored with the round's evaluation; none recomputes it.
"""

import dagster as dg

from tao_pipeline.defs.resources import LakeResource
from tao_pipeline.evaluation import VERDICTS_TABLE, RoundVerdict

EVALUATION = dg.AssetKey("checkpoint_evaluation")


@dg.asset_check(
    asset=EVALUATION,
    blocking=True,
    description="The challenger is proven better on held-out prompts (win-rate interval and sign test) and no "
    "guard regresses.",
)
def challenger_beats_champion(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    verdict = _stored_verdict(context, lake).promotion
    return dg.AssetCheckResult(
        passed=verdict.promote,
        description=verdict.reason,
        metadata={
            "evidence": verdict.evidence,
            "heldout_prompts": verdict.heldout,
            "win_rate": verdict.win_rate,
            "win_rate_low": verdict.win_rate_low,
            "win_rate_high": verdict.win_rate_high,
            "confidence": verdict.confidence,
            "sign_test_p": verdict.sign_test_p,
            "champion_accuracy": verdict.champion_accuracy,
            "challenger_accuracy": verdict.challenger_accuracy,
            "length_ratio": verdict.length_ratio,
        },
    )


@dg.asset_check(
    asset=EVALUATION,
    description="The tuned model gains more than the control arm trained on random preference directions.",
)
def tao_beats_control(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    control = _stored_verdict(context, lake).control
    return dg.AssetCheckResult(
        passed=not control.alarm,
        severity=dg.AssetCheckSeverity.WARN,
        description=control.message,
        metadata={
            "enabled": control.enabled,
            "measure": control.measure,
            "tao_gain": control.tao_gain,
            "control_gain": control.control_gain,
        },
    )


@dg.asset_check(
    asset=EVALUATION,
    description="Collapse guard: no round where the scorer's reward rose while held-out accuracy fell.",
)
def reward_tracks_accuracy(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    verdict = _stored_verdict(context, lake)
    return dg.AssetCheckResult(
        passed=not verdict.collapse_alerts,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(verdict.collapse_alerts) or "reward and held-out accuracy moved together in every round",
        metadata={"rounds": verdict.evaluated_rounds, "alerts": len(verdict.collapse_alerts)},
    )


def _stored_verdict(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> RoundVerdict:
    return RoundVerdict.from_frame(lake.get().read(VERDICTS_TABLE, context.run.tags["dagster/partition"]))

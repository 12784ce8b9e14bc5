"""The promotion: the round's challenger becomes champion when its stored verdict says so (with live.enabled,
it goes on live traffic first)."""

import dagster as dg

from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.evaluation import VERDICTS_TABLE, RoundVerdict
from tao_pipeline.live.gate import apply_gate_verdict
from tao_pipeline.registry import ModelVersion


@dg.asset(**ROUND_STAGE, deps=["checkpoint_evaluation"], kinds={"duckdb"})
def champion(
    context: dg.AssetExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Promote the round's challenger in the registry when its stored verdict says so. The blocking check
    challenger_beats_champion gates this asset on the same verdict, and it is applied here too, so a
    hand-started materialization cannot promote a loser."""
    round_id, config = context.partition_key, settings.get()
    verdict = RoundVerdict.from_frame(lake.get().read(VERDICTS_TABLE, round_id))
    reason, collapse = verdict.promotion.reason, verdict.champion_collapse if config.evaluation.auto_rollback else None
    current, live = apply_gate_verdict(
        model_store.get(), config, round_id, verdict.challenger_version, verdict.promote, reason, collapse
    )
    context.log.info(f"champion after {round_id}: {current.version_id} ({reason}); on live traffic: {live}")
    metadata = {**_metadata(current, verdict), "auto_rollback": collapse or "no", "live": live}
    return dg.MaterializeResult(metadata=metadata)


def _metadata(current: ModelVersion, verdict: RoundVerdict) -> dict:
    return {
        "champion": current.version_id,
        "promoted": verdict.promote,
        "reason": verdict.promotion.reason,
        "champion_path": dg.MetadataValue.path(str(current.path)),
    }

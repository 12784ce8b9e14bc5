"""The preflight before generation: does each task of the round have label-free signal? A warning, never a gate.

It samples the round's train prompts (up to preflight.prompts_per_task per task) with the round's own
starting model and sampling, through the response and score caches, so candidate_responses and
response_scores reuse every sample and score: it adds no generation, only a model load and the scoring.
"""

import dagster as dg

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.defs.constants import HEAVY_POOL
from tao_pipeline.defs.costs import stage_cost
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.evaluation.preflight import PreflightReport, run_preflight
from tao_pipeline.registry.policy import CANDIDATES_TABLE, round_starting_model

PROMPTS = dg.AssetKey("raw_prompts")
# The in-process executor runs ready steps by priority: this check before candidate_responses.
RUN_BEFORE_GENERATION = {"dagster/priority": "1"}


@dg.asset_check(
    asset=PROMPTS,
    blocking=False,
    pool=HEAVY_POOL,
    op_tags=RUN_BEFORE_GENERATION,
    description="Preflight: self-consistency (or the configured scorer) has signal in every task of the round.",
)
def preflight_signal(
    context: dg.AssetCheckExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.AssetCheckResult:
    config, store, round_id = settings.get(), lake.get(), context.run.tags["dagster/partition"]
    if not config.preflight.check_before_generation:
        return _not_run("off (preflight.check_before_generation = false); `tao preflight` runs it by hand")
    if store.exists(CANDIDATES_TABLE, round_id):
        return _not_run(f"{round_id} has its candidates already: a preflight comes before generation")
    try:
        start = round_starting_model(
            model_store.get(), store, round_id, config.model, config.flywheel.start_from, log=context.log.info
        )
        with StageMeter() as meter:  # its samples and scores are the round's: part of what the round cost
            # No labels here: inside a round only evaluation reads them (`tao preflight` may, by hand).
            report = run_preflight(store.read("raw_prompts", round_id), start.path, start.version_id, config)
        stage_cost(store, round_id, "preflight", meter, config.costs)
    except Exception as error:  # noqa: BLE001 - a warning must never fail the round it warns about
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"the preflight could not run: {type(error).__name__}: {error}"[:1000],
            metadata={"ran": False},
        )
    return _result(report)


def _not_run(reason: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=True, severity=dg.AssetCheckSeverity.WARN, description=reason, metadata={"ran": False}
    )


def _result(report: PreflightReport) -> dg.AssetCheckResult:
    minutes = report.round_generation_minutes()
    return dg.AssetCheckResult(
        passed=report.tasks_with_signal == len(report.tasks),
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(report.verdicts()),
        metadata={
            "ran": True,
            "tasks": len(report.tasks),
            "tasks_with_signal": report.tasks_with_signal,
            "prompts_sampled": len(report.prompts),
            "labeled_prompts": int(report.tasks["labeled"].sum()),
            "model_version": report.model_version,
            "per_task": md_table(report.table(), rows=len(report.tasks)),
            "agreement": md_table(report.agreement_histogram(), rows=report.samples_per_prompt + 1),
            "minutes": round(report.seconds / 60, 2),
            "prompts_generated": report.cache.generated_prompts,
            "prompts_from_cache": report.cache.cached_prompts,
            "tokens_per_second": round(report.generation.tokens_per_second, 1),
            **({"round_generation_minutes": round(minutes, 1)} if minutes is not None else {}),
        },
    )

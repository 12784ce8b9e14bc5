"""Stage 2: N sampled candidate responses per train prompt from the round's starting model."""

from pathlib import Path

import dagster as dg

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.data.answers import LoggedAnswers, logged_answers
from tao_pipeline.defs.constants import HEAVY_POOL
from tao_pipeline.defs.costs import stage_cost
from tao_pipeline.defs.metadata import md_table
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, ModelStoreResource, TaoSettingsResource
from tao_pipeline.generation import Candidates, generate_candidates
from tao_pipeline.registry.policy import round_starting_model


@dg.asset(**ROUND_STAGE, deps=["raw_prompts"], kinds={"pytorch", "parquet"}, pool=HEAVY_POOL)
def candidate_responses(
    context: dg.AssetExecutionContext,
    settings: TaoSettingsResource,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Sample generation.num_samples responses per train prompt from the round's starting model (the champion,
    or the challenger flywheel.start_from picks), the same model when it is re-materialized (cached responses
    are not generated again)."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    train = store.read("raw_prompts", round_id).query("split == 'train'")
    start = round_starting_model(
        model_store.get(), store, round_id, config.model, config.flywheel.start_from, log=context.log.info
    )
    context.log.info(f"generating with {start.version_id} for {len(train)} prompts")
    logged = logged_answers(store, train["prompt_id"].tolist())
    _warn_of_unknown_feedback(context, logged)
    with StageMeter() as meter:
        candidates = generate_candidates(train, start.path, start.version_id, config, logged.answers)
    path = store.write("candidate_responses", round_id, candidates.responses.assign(round=round_id))
    metadata = {"model_version": start.version_id, "prompts": len(train), **_metadata(candidates)}
    metadata["feedback_for_unknown_responses"] = logged.unknown_feedback
    cost = stage_cost(store, round_id, "candidate_responses", meter, config.costs)
    return dg.MaterializeResult(metadata={**metadata, **meter.metadata(), **cost, **_previews(candidates, path)})


def _warn_of_unknown_feedback(context: dg.AssetExecutionContext, logged: LoggedAnswers) -> None:
    if logged.unknown_feedback:
        context.log.warning(
            f"{logged.unknown_feedback} feedback events rate responses no usage log holds "
            f"(e.g. {', '.join(logged.unknown_examples)}): kept in log_events, unused until their answers arrive"
        )


def _metadata(candidates: Candidates) -> dict:
    cache, stats = candidates.cache, candidates.stats
    return {
        "prompts_from_cache": cache.cached_prompts,
        "prompts_generated": cache.generated_prompts,
        "shards_written": cache.shards_written,
        "responses": len(candidates.responses),
        "new_tokens": stats.new_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "generation_seconds": round(stats.seconds, 1),
        "logged_answers_as_samples": candidates.answers.logged_samples,  # one fewer sample generated for each
        "user_corrections": candidates.answers.corrections,
        "rated_candidates": candidates.answers.rated_candidates,
        "history_turns_cut": stats.history_turns_cut,  # oldest turns left out to fit the prompt budget
        **stats.threads_metadata(),
    }


def _previews(candidates: Candidates, path: Path) -> dict:
    responses = candidates.responses
    return {
        "finish_reasons": md_table(responses["finish_reason"].value_counts().rename("responses").reset_index()),
        "preview": md_table(responses[["prompt_id", "sample_index", "response", "finish_reason"]]),
        "path": dg.MetadataValue.path(str(path)),
    }

"""Stage 3: label-free scores for every candidate, with the per-scorer parts."""

import dagster as dg

from tao_pipeline.assets.metadata import histogram, md_table, plot
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.profiling import PeakMemory
from tao_pipeline.reporting import score_distribution_plot
from tao_pipeline.resources import LakeResource, TaoSettingsResource
from tao_pipeline.scoring import ScoreCache, build_scorer, score_responses


@dg.asset(partitions_def=rounds_partitions, group_name="tao_round", deps=["candidate_responses"],
          kinds={"python", "parquet"})
def response_scores(context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource) -> dg.MaterializeResult:
    """Score each prompt's candidates with the composite scorer routed by task (cached per candidate group)."""
    config = settings.get()
    store = lake.get()
    prompts = store.read("raw_prompts", context.partition_key)
    candidates = store.read("candidate_responses", context.partition_key)
    cache = ScoreCache(config.cache_dir, config.scoring)
    with PeakMemory() as memory:
        scores = score_responses(candidates, prompts, build_scorer(config.scoring, config.cache_dir), cache=cache)
    path = store.write("response_scores", context.partition_key, scores.assign(round=context.partition_key))
    per_task = scores.groupby("task")["score"].describe()[["count", "mean", "std", "min", "max"]].round(3)
    lengths = candidates.set_index("response_id")["response"].str.len()
    length_corr = scores.set_index("response_id")["score"].corr(lengths)
    return dg.MaterializeResult(metadata={
        "responses": len(scores),
        "mean_score": round(float(scores["score"].mean()), 3),
        "score_length_correlation": round(float(length_corr), 3) if length_corr == length_corr else 0.0,
        "failures": int(scores["failures"].notna().sum()),
        "prompts_from_cache": cache.cached_groups,
        "prompts_scored": cache.scored_groups,
        **memory.metadata(),
        "score_distribution": plot(score_distribution_plot(scores)),
        "score_histogram": histogram(scores["score"]),
        "per_task": md_table(per_task.reset_index()),
        "path": dg.MetadataValue.path(str(path)),
    })

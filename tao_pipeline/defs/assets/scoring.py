"""Stage 3: label-free scores for every candidate, with the per-scorer parts."""

import dagster as dg
import pandas as pd

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.defs.costs import stage_cost
from tao_pipeline.defs.metadata import histogram, md_table, plot
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, TaoSettingsResource
from tao_pipeline.evaluation.plots import score_distribution_plot
from tao_pipeline.scoring import ScoreCache, score_candidates


@dg.asset(**ROUND_STAGE, deps=["candidate_responses"], kinds={"python", "parquet"})
def response_scores(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource
) -> dg.MaterializeResult:
    """Score each prompt's candidates with the composite scorer routed by task (cached per candidate group)."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    prompts = store.read("raw_prompts", round_id)
    candidates = store.read("candidate_responses", round_id)
    with StageMeter() as meter:
        scores, cache = score_candidates(candidates, prompts, config.scoring, config.cache_dir)
    path = store.write("response_scores", round_id, scores.assign(round=round_id))
    return dg.MaterializeResult(
        metadata={
            **_metadata(scores, candidates, cache),
            **meter.metadata(),
            **stage_cost(store, round_id, "response_scores", meter, config.costs),
            **_distributions(scores),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


def _metadata(scores: pd.DataFrame, candidates: pd.DataFrame, cache: ScoreCache) -> dict:
    lengths = candidates.set_index("response_id")["response"].str.len()
    length_corr = scores.set_index("response_id")["score"].corr(lengths)
    return {
        "responses": len(scores),
        "mean_score": round(float(scores["score"].mean()), 3),
        "score_length_correlation": round(float(length_corr), 3) if length_corr == length_corr else 0.0,
        "failures": int(scores["failures"].notna().sum()),
        "unscored": int(scores["score"].isna().sum()),  # a failed part that counts: never paired
        "prompts_from_cache": cache.cached_groups,
        "prompts_scored": cache.scored_groups,
    }


def _distributions(scores: pd.DataFrame) -> dict:
    per_task = scores.groupby("task")["score"].describe()[["count", "mean", "std", "min", "max"]].round(3)
    return {
        "score_distribution": plot(score_distribution_plot(scores)),
        "score_histogram": histogram(scores["score"]),
        "per_task": md_table(per_task.reset_index()),
    }

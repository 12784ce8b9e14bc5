"""Stage 4: preference pairs (best vs worst candidate) where the score margin is clear."""

import dagster as dg
import pandas as pd

from tao_pipeline.defs.metadata import histogram, md_table
from tao_pipeline.defs.partitions import ROUND_STAGE
from tao_pipeline.defs.resources import LakeResource, TaoSettingsResource
from tao_pipeline.training.pairs import PairStats, build_pairs


@dg.asset(**ROUND_STAGE, deps=["response_scores"], kinds={"python", "parquet"})
def preference_pairs(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource
) -> dg.MaterializeResult:
    """chosen = best, rejected = worst per prompt, kept only when the margin clears pairs.min_margin."""
    config, store, round_id = settings.get(), lake.get(), context.partition_key
    pairs, stats = build_pairs(
        store.read("raw_prompts", round_id),
        store.read("candidate_responses", round_id),
        store.read("response_scores", round_id),
        config.pairs.min_margin,
    )
    path = store.write("preference_pairs", round_id, pairs.assign(round=round_id))
    return dg.MaterializeResult(metadata={**_metadata(pairs, stats), "path": dg.MetadataValue.path(str(path))})


def _metadata(pairs: pd.DataFrame, stats: PairStats) -> dict:
    return {
        "prompts": stats.prompts,
        "pairs": stats.pairs,
        "unscored_responses": stats.unscored_responses,
        **{f"dropped_{reason}": count for reason, count in stats.dropped.items()},
        "margin_histogram": histogram(pairs["margin"]),
        "per_task": md_table(pairs.groupby("task").size().rename("pairs").reset_index()),
        "preview": md_table(pairs[["task", "prompt", "chosen", "rejected", "margin"]]),
    }

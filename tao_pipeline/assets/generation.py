"""Stage 2: N sampled candidate responses per train prompt from the round's starting model."""

import dagster as dg

from tao_pipeline.assets.metadata import md_table
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.generation import SamplingParams, generation_cache, lazy_generator
from tao_pipeline.profiling import PeakMemory
from tao_pipeline.resources import LakeResource, ModelStoreResource, TaoSettingsResource

HEAVY_POOL = "gpu"


@dg.asset(
    partitions_def=rounds_partitions, group_name="tao_round", deps=["raw_prompts"],
    kinds={"pytorch", "parquet"}, pool=HEAVY_POOL,
)
def candidate_responses(
    context: dg.AssetExecutionContext, settings: TaoSettingsResource, lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Sample generation.num_samples responses per train prompt, recording model version and sampling.

    A round starts from the champion of the moment it first generates; re-materializing the round
    keeps that starting model, and responses already in the cache are not generated again.
    """
    config = settings.get()
    store, round_id = lake.get(), context.partition_key
    prompts = store.read("raw_prompts", round_id)
    train = prompts[prompts["split"] == "train"]
    models = model_store.get()
    if store.exists("candidate_responses", round_id):
        start = models.get(store.read("candidate_responses", round_id)["model_version"].iloc[0])
    else:
        start = models.champion(config.model, log=context.log.info)
    context.log.info(f"generating with {start.version_id} for {len(train)} prompts")
    gen = config.generation
    params = SamplingParams(gen.num_samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    model = lazy_generator(start.path, start.version_id, config)
    with PeakMemory() as memory:
        responses, cache = generation_cache(config).generate(model, train, params)
        model.close()  # free the GPU (vLLM) before training runs in the same process
    path = store.write("candidate_responses", round_id, responses.assign(round=round_id))
    if cache.cached_prompts:
        context.log.info(f"{cache.cached_prompts} prompts came from the cache (an interrupted or earlier run)")
    stats = model.stats
    return dg.MaterializeResult(metadata={
        "model_version": start.version_id,
        "prompts": len(train),
        "prompts_from_cache": cache.cached_prompts,
        "prompts_generated": cache.generated_prompts,
        "shards_written": cache.shards_written,
        "responses": len(responses),
        "new_tokens": stats.new_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "generation_seconds": round(stats.seconds, 1),
        **memory.metadata(),
        "finish_reasons": md_table(responses["finish_reason"].value_counts().rename("responses").reset_index()),
        "preview": md_table(responses[["prompt_id", "sample_index", "response", "finish_reason"]]),
        "path": dg.MetadataValue.path(str(path)),
    })

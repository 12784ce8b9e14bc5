"""Stage 2: N sampled candidate responses per train prompt from the current champion."""

import dagster as dg

from tao_pipeline.assets.metadata import md_table
from tao_pipeline.assets.partitions import rounds_partitions
from tao_pipeline.generation import SamplingParams, build_generator
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
    """Sample generation.num_samples responses per train prompt, recording model version and sampling."""
    config = settings.get()
    prompts = lake.get().read("raw_prompts", context.partition_key)
    train = prompts[prompts["split"] == "train"]
    champion = model_store.get().champion(config.model, log=context.log.info)
    context.log.info(f"generating with champion {champion.version_id} for {len(train)} prompts")
    generator = build_generator(champion.path, champion.version_id, config.generation, config.model)
    gen = config.generation
    params = SamplingParams(gen.num_samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    responses = generator.generate(train, params)
    if hasattr(generator, "close"):
        generator.close()  # free the GPU (vLLM) before training runs in the same process
    path = lake.get().write("candidate_responses", context.partition_key,
                            responses.assign(round=context.partition_key))
    stats = generator.stats
    return dg.MaterializeResult(metadata={
        "model_version": champion.version_id,
        "prompts": stats.prompts,
        "responses": stats.responses,
        "new_tokens": stats.new_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "seconds": round(stats.seconds, 1),
        "finish_reasons": md_table(responses["finish_reason"].value_counts().rename("responses").reset_index()),
        "preview": md_table(responses[["prompt_id", "sample_index", "response", "finish_reason"]]),
        "path": dg.MetadataValue.path(str(path)),
    })

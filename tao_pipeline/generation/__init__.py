"""Candidate generation: the Generator protocol, its backends, and the response cache in front of them."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tao_pipeline.data.answers import ANSWER_COLUMNS
from tao_pipeline.generation.base import RESPONSE_COLUMNS, GenerationStats, Generator, SamplingParams
from tao_pipeline.generation.cache import CacheStats, GenerationCache, LazyGenerator
from tao_pipeline.generation.logged import (
    CORRECTION,
    AnswerUse,
    answer_rows,
    correction_rows,
    own_answers,
    with_ratings,
)
from tao_pipeline.settings import GenerationSettings, ModelSettings, TaoSettings

__all__ = [
    "RESPONSE_COLUMNS",
    "CacheStats",
    "Candidates",
    "GenerationCache",
    "GenerationStats",
    "Generator",
    "LazyGenerator",
    "SamplingParams",
    "build_generator",
    "generate_candidates",
    "generation_cache",
    "lazy_generator",
]


@dataclass
class Candidates:
    responses: pd.DataFrame  # RESPONSE_COLUMNS, one row per (prompt, sample)
    cache: CacheStats  # prompts taken from the cache vs generated now
    stats: GenerationStats  # what the model generated now (tokens, seconds)
    answers: AnswerUse = field(default_factory=AnswerUse)  # logged answers and corrections taken


def generate_candidates(
    prompts: pd.DataFrame,
    model_path: Path | str,
    model_version: str,
    settings: TaoSettings,
    answers: pd.DataFrame | None = None,
) -> Candidates:
    """``generation.num_samples`` responses per prompt from one model, through the response cache.

    ``answers`` (``logged_answers``): a prompt the model already answered in the logs gets one
    sample fewer and that answer instead; users' corrections are added as candidates, and every
    candidate gets the mean rating users gave its text (``rating``, missing when none).
    """
    gen = settings.generation
    params = SamplingParams(gen.num_samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    answers = answers if answers is not None else pd.DataFrame(columns=ANSWER_COLUMNS)
    own = own_answers(answers, model_version)
    own = own[own["prompt_id"].isin(set(prompts["prompt_id"]))]
    answered = prompts["prompt_id"].isin(set(own["prompt_id"]))
    model = lazy_generator(model_path, model_version, settings)
    cache = generation_cache(settings)
    try:
        tables, stats = [], CacheStats()
        for group, group_params in ((prompts[~answered], params), (prompts[answered], _one_fewer(params))):
            if len(group) and group_params.num_samples:
                table, group_stats = cache.generate(model, group, group_params)
                tables.append(table)
                stats = _added(stats, group_stats)
    finally:
        model.close()  # free the GPU (vLLM) before training runs in the same process
    tables.append(answer_rows(own, model_version, params.num_samples - 1))
    tables.append(correction_rows(answers, set(prompts["prompt_id"]), params.num_samples))
    filled = [table for table in tables if len(table)]
    responses = pd.concat(filled, ignore_index=True) if filled else pd.DataFrame(columns=RESPONSE_COLUMNS)
    responses = with_ratings(responses, answers).sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)
    use = AnswerUse(
        len(own), int((responses["finish_reason"] == CORRECTION).sum()), int(responses["rating"].notna().sum())
    )
    return Candidates(responses, stats, model.stats, use)


def _one_fewer(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, num_samples=params.num_samples - 1)


def _added(first: CacheStats, second: CacheStats) -> CacheStats:
    return CacheStats(
        first.cached_prompts + second.cached_prompts,
        first.generated_prompts + second.generated_prompts,
        first.shards_written + second.shards_written,
    )


def generation_cache(settings: TaoSettings) -> GenerationCache:
    return GenerationCache(settings.cache_dir, settings.generation.shard_prompts, settings.generation.max_prompt_tokens)


def lazy_generator(model_path: Path | str, model_version: str, settings: TaoSettings) -> LazyGenerator:
    """A generator for the model that is only loaded if the cache lacks something."""
    return LazyGenerator(
        model_version, lambda: build_generator(model_path, model_version, settings.generation, settings.model)
    )


def build_generator(
    model_path: Path | str, model_version: str, generation: GenerationSettings, model: ModelSettings
) -> Generator:
    """The backend named by ``generation.backend``, loaded with the model's weights."""
    backend = generation.backend
    if backend == "auto":
        from tao_pipeline.generation.vllm_backend import vllm_available

        backend = "vllm" if vllm_available() else "transformers"
    if backend == "vllm":
        from tao_pipeline.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(
            model_path,
            model_version,
            tensor_parallel_size=generation.tensor_parallel_size,
            gpu_memory_utilization=generation.gpu_memory_utilization,
            max_model_len=generation.max_model_len,
            dtype=model.dtype,
            max_prompt_tokens=generation.max_prompt_tokens,
            trust_remote_code=model.trust_remote_code,
        )
    if backend == "openai":
        from tao_pipeline.generation.openai_backend import OpenAIGenerator

        endpoint = generation.endpoint
        return OpenAIGenerator(
            model_path,
            model_version,
            base_url=endpoint.base_url,
            api_key_env=endpoint.api_key_env,
            served_name=endpoint.model_names.get(model_version),
            concurrency=endpoint.concurrency,
            timeout_s=endpoint.timeout_s,
            max_retries=endpoint.max_retries,
            load_lora_adapters=endpoint.load_lora_adapters,
        )
    if backend == "transformers":
        from tao_pipeline.generation.transformers_backend import TransformersGenerator

        return TransformersGenerator(
            model_path,
            model_version,
            dtype=model.dtype,
            batch_size=generation.batch_size,
            batch_rows=generation.batch_size * generation.num_samples,
            max_prompt_tokens=generation.max_prompt_tokens,
            trust_remote_code=model.trust_remote_code,
            decoder=generation.decoder,
            threads=generation.threads,
        )
    raise ValueError(f"setting 'generation.backend': unknown backend {generation.backend!r}")

"""Candidate generation: the Generator protocol, its backends, and the response cache in front of them."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.generation.base import RESPONSE_COLUMNS, GenerationStats, Generator, SamplingParams
from tao_pipeline.generation.cache import CacheStats, GenerationCache, LazyGenerator
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


def generate_candidates(
    prompts: pd.DataFrame, model_path: Path | str, model_version: str, settings: TaoSettings
) -> Candidates:
    """``generation.num_samples`` sampled responses per prompt from one model, through the response cache."""
    gen = settings.generation
    params = SamplingParams(gen.num_samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    model = lazy_generator(model_path, model_version, settings)
    try:
        responses, cache = generation_cache(settings).generate(model, prompts, params)
    finally:
        model.close()  # free the GPU (vLLM) before training runs in the same process
    return Candidates(responses, cache, model.stats)


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

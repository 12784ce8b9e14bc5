"""Candidate generation on a GPU: vLLM against the transformers backend, same prompts, model and sampling.

Both run in this one process, one after the other, so the ratio is measured side by side.
Needs a CUDA GPU and the `gpu` extra; elsewhere it says so and exits 0. Prints; asserts nothing.

    .venv/bin/python bench/vllm_vs_transformers.py [--prompts 256] [--samples 8] [--model DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from tao_pipeline.data.ingest import load_prompts
from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.generation import SamplingParams
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tao_pipeline.generation.vllm_backend import VLLMGenerator, vllm_available
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--model", help="Model dir (default: the champion of the configured home).")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    if not vllm_available():
        print("no CUDA GPU with vLLM here: install the gpu extra on a GPU machine (see docs/deployment.md)")
        sys.exit(0)

    settings = load_settings(DEMO_CONFIG)  # the demo's prompts and sampling settings
    if args.model:
        model_path, version = args.model, "bench"
    else:
        champion = ModelStore(settings.models_dir).champion(settings.model)
        model_path, version = champion.path, champion.version_id
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    prompts = prompts.sample(n=min(args.prompts, len(prompts)), replace=False, random_state=0)
    gen = settings.generation
    params = SamplingParams(args.samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    print(
        f"{torch.cuda.get_device_name()}: {model_path}, {len(prompts)} prompts x {args.samples} samples, "
        f"max_new_tokens {gen.max_new_tokens}"
    )

    results = {}
    for name, build in [
        ("transformers", lambda: TransformersGenerator(model_path, version, dtype="bfloat16", batch_size=64)),
        (
            "vllm",
            lambda: VLLMGenerator(
                model_path, version, dtype="bfloat16", tensor_parallel_size=args.tensor_parallel_size
            ),
        ),
    ]:
        generator = build()
        generator.generate(prompts.head(8), params, progress=False)  # warm-up: kernels, CUDA graphs
        generator.stats = type(generator.stats)()
        generator.generate(prompts, params)
        results[name] = generator.stats.tokens_per_second
        print(
            f"{name}: {generator.stats.new_tokens} tokens in {generator.stats.seconds:.1f} s "
            f"= {results[name]:.0f} tokens/s"
        )
        if hasattr(generator, "close"):
            generator.close()
        del generator
        gc.collect()
        torch.cuda.empty_cache()
    print(f"vLLM speed-up: {results['vllm'] / results['transformers']:.1f}x")


if __name__ == "__main__":
    main()

"""Candidate generation throughput: the pipeline's batched sampler vs a naive one-prompt, one-sample loop.

Both run in this one process on the same prompts, model and sampling settings, so the ratio
is measured side by side. Prints the figures; asserts nothing.

    .venv/bin/python bench/generation_throughput.py [--prompts 32] [--samples 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from tao_pipeline.generation import SamplingParams
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tao_pipeline.model_store import ModelStore
from tao_pipeline.modeling import build_chat
from tao_pipeline.prompts import load_prompts
from tao_pipeline.settings import load_settings


def naive_loop(generator: TransformersGenerator, prompts, params: SamplingParams) -> tuple[int, float]:
    """What a first script does: one generate() call per prompt and sample, fp32 off the shelf."""
    tokenizer, model = generator.tokenizer, generator.model
    new_tokens, started = 0, time.perf_counter()
    for row in prompts.itertuples():
        ids = tokenizer.apply_chat_template(build_chat(row.prompt, row.system), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        for _ in range(params.num_samples):
            out = model.generate(**ids, max_new_tokens=params.max_new_tokens, do_sample=True,
                                 temperature=params.temperature, top_p=params.top_p,
                                 pad_token_id=tokenizer.pad_token_id)
            new_tokens += out.shape[1] - ids["input_ids"].shape[1]
    return new_tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--naive-prompts", type=int, default=8, help="The naive loop is slow; time it on fewer.")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()

    settings = load_settings()
    champion = ModelStore(settings.models_dir).champion(settings.model)
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    prompts = prompts[prompts["split"] == "train"].head(args.prompts)
    gen = settings.generation
    params = SamplingParams(args.samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    print(f"model {champion.version_id}, {len(prompts)} prompts x {args.samples} samples, "
          f"max_new_tokens {gen.max_new_tokens}, torch threads {torch.get_num_threads()}")

    batched = TransformersGenerator(champion.path, champion.version_id, dtype=settings.model.dtype,
                                    batch_size=gen.batch_size)
    batched.generate(prompts, params)
    fast = batched.stats.tokens_per_second
    print(f"batched ({batched.model.dtype}, batch {gen.batch_size} prompts): "
          f"{batched.stats.new_tokens} tokens in {batched.stats.seconds:.1f} s = {fast:.1f} tokens/s")

    naive = TransformersGenerator(champion.path, champion.version_id, dtype="float32")
    tokens, seconds = naive_loop(naive, prompts.head(args.naive_prompts), params)
    slow = tokens / seconds
    print(f"naive loop (float32, 1 prompt x 1 sample per call): {tokens} tokens in {seconds:.1f} s = {slow:.1f} tokens/s")
    print(f"speed-up: {fast / slow:.1f}x")


if __name__ == "__main__":
    main()

"""Throughput, measured side by side in one run: generation vs a naive loop, DPO steps/s, each stage of a round.

1. Candidate generation: the pipeline's batched sampler against a naive one-prompt, one-sample
   ``generate`` loop, same prompts, model and sampling settings, in this one process.
2. A default round on the bundled demo logs in a fresh home: wall time and peak resident memory
   per stage (from the Dagster event log and each stage's recorded peak), and DPO seconds per step.

    .venv/bin/python bench/throughput.py [--prompts 32] [--skip-round] [--base-model-from ~/.tao]
"""

from __future__ import annotations

import time

import torch
from common import DEMO, bench_parser, fresh_home, run_metadata, show

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.ingest import load_prompts
from tao_pipeline.data.prompts import build_chat
from tao_pipeline.generation import SamplingParams
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings


def naive_loop(generator: TransformersGenerator, prompts, params: SamplingParams) -> tuple[int, float]:
    """What a first script does: one generate() call per prompt and sample, fp32 off the shelf."""
    tokenizer, model = generator.tokenizer, generator.model
    new_tokens, started = 0, time.perf_counter()
    for row in prompts.itertuples():
        ids = tokenizer.apply_chat_template(
            build_chat(row.prompt, row.system), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        for _ in range(params.num_samples):
            out = model.generate(
                **ids,
                max_new_tokens=params.max_new_tokens,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens += out.shape[1] - ids["input_ids"].shape[1]
    return new_tokens, time.perf_counter() - started


def generation_speedup(settings, prompt_count: int, naive_count: int, samples: int) -> None:
    base = ModelStore(settings.models_dir).champion(settings.model)
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    prompts = prompts[prompts["split"] == "train"].head(prompt_count)
    gen = settings.generation
    params = SamplingParams(samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    print(
        f"model {base.version_id}, {len(prompts)} prompts x {samples} samples, "
        f"max_new_tokens {gen.max_new_tokens}, torch threads {torch.get_num_threads()}"
    )
    batched = TransformersGenerator(base.path, base.version_id, dtype=settings.model.dtype, batch_size=gen.batch_size)
    batched.generate(prompts, params)
    fast = batched.stats.tokens_per_second
    print(
        f"batched ({batched.model.dtype}, batch {gen.batch_size} prompts): "
        f"{batched.stats.new_tokens} tokens in {batched.stats.seconds:.1f} s = {fast:.1f} tokens/s"
    )
    naive = TransformersGenerator(base.path, base.version_id, dtype="float32")
    tokens, seconds = naive_loop(naive, prompts.head(naive_count), params)
    print(
        f"naive loop (float32, 1 prompt x 1 sample per call, {naive_count} prompts): "
        f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s"
    )
    print(f"generation speed-up: {fast / (tokens / seconds):.1f}x")


def round_stages() -> None:
    report = run_round(DEMO, [], echo=print)
    if not report.completed:
        raise SystemExit(f"{report.round_id} failed; see `tao ui`")
    settings = load_settings(DEMO)
    show(f"{report.round_id}: per stage ({report.seconds / 60:.1f} min in all)", report.stages)
    training = run_metadata(settings.dagster_home, report.run_id, "tuned_checkpoint")
    generated = run_metadata(settings.dagster_home, report.run_id, "candidate_responses")
    print(
        f"\ncandidate generation in the round: {generated['new_tokens']} tokens, "
        f"{generated['tokens_per_second']} tokens/s"
    )
    print(
        f"DPO: {training['steps']} steps in {training['seconds']} s = {training['seconds_per_step']} s/step "
        f"= {1 / training['seconds_per_step']:.3f} steps/s"
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--naive-prompts", type=int, default=8, help="The naive loop is slow; time it on fewer.")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-round", action="store_true", help="Only the generation comparison.")
    args = parser.parse_args()
    fresh_home("throughput", args.base_model_from)
    settings = load_settings(DEMO)
    generation_speedup(settings, args.prompts, args.naive_prompts, args.samples)
    if not args.skip_round:
        round_stages()


if __name__ == "__main__":
    main()

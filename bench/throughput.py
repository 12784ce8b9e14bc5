"""Throughput, measured side by side in one run: the three ratios of issue #15, then a summary.

1. Candidate generation: tao's decode loop (one prefill per prompt, finished rows leave the batch, exact top-p
   without sorting the vocabulary) against what it replaced (transformers' ``generate`` with
   ``num_return_sequences``: ``generation.decoder='generate'``), alternating batch by batch on the same prompts,
   model and sampling settings in this one process; then a naive one-prompt, one-sample ``generate`` loop.
   ``--profile`` prints torch.profiler's top operators of one 16 prompts x 8 samples x 32 tokens call of each.
2. DPO step time: the step as it computed before against now, alternating steps (see dpo_step.py).
3. The demo round computed as before (``BEFORE``), then as now, each in a fresh home: minutes, time per stage,
   the promotion and the labeled accuracy of each.

    .venv/bin/python bench/throughput.py [--prompts 32] [--dpo-steps 10] [--skip-round] [--profile]
                                         [--base-model-from ~/.tao]
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from common import DEMO, bench_parser, fresh_home, run_metadata, show
from dpo_step import demo_pairs, dpo_step_ratio, embedded_model
from dpo_step import report as report_steps

from tao_pipeline.cli.runner import RoundReport, run_round
from tao_pipeline.data.conversation import build_chat
from tao_pipeline.data.ingest import load_prompts
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


def generation_speedup(
    settings, prompt_count: int, naive_count: int, samples: int, profile: bool, batch_size: int | None
) -> float:
    base = ModelStore(settings.models_dir).champion(settings.model)
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    prompts = prompts[prompts["split"] == "train"].head(prompt_count)
    gen = settings.generation
    batch_size = batch_size or gen.batch_size
    params = SamplingParams(samples, gen.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    print(
        f"model {base.version_id}, {len(prompts)} prompts x {samples} samples, max_new_tokens {gen.max_new_tokens}, "
        f"temperature {gen.temperature}, top_p {gen.top_p}, torch threads {torch.get_num_threads()}"
    )
    old, new = (
        TransformersGenerator(base.path, base.version_id, dtype=settings.model.dtype, batch_size=batch_size, decoder=d)
        for d in ("generate", "loop")
    )
    rows, cpu_seconds = _alternate({"old": old, "new": new}, prompts, params, batch_size)
    for name, sampler in (("old: HF generate()", old), ("new: decode loop", new)):
        stats = sampler.stats
        print(
            f"{name} ({sampler.model.dtype}, batch {batch_size} prompts): {stats.new_tokens} tokens "
            f"in {stats.seconds:.1f} s = {stats.tokens_per_second:.1f} tokens/s"
        )
    for name, sampler in (("old", old), ("new", new)):
        per_token = cpu_seconds[name] / sampler.stats.new_tokens * 1000
        print(f"{name}: {_describe(rows[name])}, {per_token:.1f} ms of process CPU time per token")
    old_rate, new_rate = old.stats.tokens_per_second, new.stats.tokens_per_second
    # On a busy machine the wall-clock ratio swings from run to run; the CPU-time one is steadier.
    cpu_ratio = (cpu_seconds["old"] / old.stats.new_tokens) / (cpu_seconds["new"] / new.stats.new_tokens)
    print(f"CPU time per token, old / new: {cpu_ratio:.2f}x")
    print(f"generation speedup: {new_rate / old_rate:.2f}x (old {old_rate:.1f} tok/s, new {new_rate:.1f} tok/s)")
    speedup = new_rate / old_rate
    if profile:
        profile_batch(old, new, prompts.head(batch_size), params)
    if naive_count:
        naive = TransformersGenerator(base.path, base.version_id, dtype="float32")
        tokens, seconds = naive_loop(naive, prompts.head(naive_count), params)
        print(
            f"naive loop (float32, 1 prompt x 1 sample per call, {naive_count} prompts): "
            f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s"
        )
        print(f"new sampler vs the naive loop: {new_rate / (tokens / seconds):.1f}x")
    return speedup


def _alternate(samplers: dict, prompts: pd.DataFrame, params: SamplingParams, batch_size: int):
    """The samplers over the same prompts, one batch each in turn, so a busy machine slows them alike.
    Returns each one's rows and the process CPU time it took."""
    warm_up = SamplingParams(2, 4, params.temperature, params.top_p)
    for sampler in samplers.values():
        sampler.generate(prompts.head(2), warm_up, progress=False)
        sampler.stats.__init__()
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in samplers}
    cpu_seconds = dict.fromkeys(samplers, 0.0)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts.iloc[start : start + batch_size]
        for name, sampler in samplers.items():
            started = time.process_time()
            frames[name].append(sampler.generate(chunk, params, progress=False))
            cpu_seconds[name] += time.process_time() - started
    return {name: pd.concat(parts) for name, parts in frames.items()}, cpu_seconds


def _describe(rows: pd.DataFrame) -> str:
    stopped = (rows["finish_reason"] == "stop").mean()
    return f"{len(rows)} responses, {rows['completion_tokens'].mean():.1f} tokens each on average, {stopped:.0%} ended"


def profile_batch(old, new, prompts: pd.DataFrame, params: SamplingParams) -> None:
    """torch.profiler's top operators (self CPU time) of one generate() call of each sampler."""
    from torch.profiler import ProfilerActivity, profile

    for name, sampler in (("old: HF generate()", old), ("new: decode loop", new)):
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            started = time.perf_counter()
            rows = sampler.generate(prompts, params, progress=False)
            seconds = time.perf_counter() - started
        tokens = int(rows["completion_tokens"].sum())
        print(f"\nprofile, {name}: {len(prompts)} prompts x {params.num_samples} samples x {params.max_new_tokens}")
        print(f"{tokens} tokens in {seconds:.1f} s under the profiler")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# The round as it computed before the decode loop and the DPO speedups.
BEFORE = [
    "generation.decoder='generate'",
    "training.precompute_ref_log_probs=false",
    "training.bf16_frozen_weights=false",
    "training.score_completions_only=false",
]


def round_stages(label: str, overrides: list[str], base_model_from: str | None) -> RoundReport:
    """A demo round in a fresh home: time per stage, generation tokens/s, DPO s/step."""
    fresh_home(f"throughput-{label}", base_model_from)
    report = run_round(DEMO, overrides, echo=lambda line: None)
    if not report.completed:
        raise SystemExit(f"{label}: {report.round_id} failed: {report.failure}")
    settings = load_settings(DEMO, overrides)
    show(f"{label}: {report.round_id} per stage ({report.seconds / 60:.1f} min in all)", report.stages)
    training = run_metadata(settings.dagster_home, report.run_id, "tuned_checkpoint")
    generated = run_metadata(settings.dagster_home, report.run_id, "candidate_responses")
    print(
        f"{label}: candidate generation {generated['new_tokens']} tokens at {generated['tokens_per_second']} tokens/s; "
        f"DPO {training['steps']} steps at {training['seconds_per_step']} s/step"
    )
    print(f"{label}: {report.verdict}")
    return report


def round_comparison(base_model_from: str | None, extra: list[str]) -> float:
    """The demo round as it computed before against now, one after the other in this run."""
    before = round_stages("before", [*BEFORE, *extra], base_model_from)
    now = round_stages("now", extra, base_model_from)
    print(f"\n{'':<8}{'minutes':>8}  {'promoted':>8}  labeled accuracy, champion -> challenger")
    for label, report in (("before", before), ("now", now)):
        accuracy = report.before_after.set_index("metric").loc["labeled accuracy (all)"]
        print(
            f"{label:<8}{report.seconds / 60:>8.1f}  {str(report.promoted):>8}  "
            f"{accuracy['champion']:.3f} {accuracy['champion_ci']} -> "
            f"{accuracy['challenger']:.3f} {accuracy['challenger_ci']}, difference {accuracy['difference']:+.3f} "
            f"{accuracy['difference_ci']}, McNemar p {accuracy['p_value']}"
        )
    return now.seconds / before.seconds


def dpo_comparison(settings, base_model_from: str | None, steps: int) -> float:
    pairs = demo_pairs(64)
    comparison = dpo_step_ratio(embedded_model(base_model_from), pairs, steps=steps, warmup=2)
    report_steps(comparison, steps, 2)
    return comparison.ratio


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument(
        "--naive-prompts", type=int, default=8, help="The naive loop is slow; time it on fewer (0: skip it)."
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=10, help="Timed DPO steps of each computation (0: skip).")
    parser.add_argument("--skip-round", action="store_true", help="Leave out the two demo rounds.")
    parser.add_argument("--profile", action="store_true", help="Profile one batch of each sampler.")
    parser.add_argument("--batch-size", type=int, help="Prompts per batch (default: the demo's generation.batch_size).")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="Both rounds.")
    args = parser.parse_args()
    fresh_home("throughput", args.base_model_from)
    settings = load_settings(DEMO)
    ratios = {"generation, new tokens/s now / before": generation_speedup(
        settings, args.prompts, args.naive_prompts, args.samples, args.profile, args.batch_size
    )}  # fmt: skip
    if args.dpo_steps:
        ratios["DPO step time, now / before"] = dpo_comparison(settings, args.base_model_from, args.dpo_steps)
    if not args.skip_round:
        ratios["demo round time, now / before"] = round_comparison(args.base_model_from, args.extra)
    print("\nratios, measured side by side in this run:")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio:.2f}")


if __name__ == "__main__":
    main()

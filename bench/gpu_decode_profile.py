"""Where a GPU decode step's time goes: the sampler's parts side by side with transformers' generate().

The GPU check (bench/gpu_check.py) found the project's sampler at 1,220 tok/s on an H200 for a 0.47B model
(16 prompts x 8 samples a batch): far below what the card can do. This script runs, on the same random model
and batch, one after another and each timed with the GPU synchronised:

- decode() with the sampler's top-p choice (what `tao` runs), with greedy choice, and with plain sampling
  (top_p = 1), so the choice's share shows;
- transformers' generate() with the same sampling settings and batch;
- the choice alone on random-model logits (nearly uniform: the nucleus is most of the vocabulary) and on
  peaked logits (as a trained model's are), per call;
- torch's profiler over a few decode steps: the operators that take the most CPU and GPU time.

With --attention instead: the decode loop with and without cuDNN's attention (``decoding.DECODE_ATTENTION``
swapped for each arm), at key lengths the process has not run yet and at lengths it has, then the whole
sampler both ways. That is how cuDNN's plan-per-shape cost was found; decoding now leaves cuDNN out.

    python3 bench/gpu_decode_profile.py [--tiny] [--attention] [--tokenizer DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import GPU, TINY, build_random_model, prompt_table, resolve_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="default: .whl/tokenizer, else the bootstrapped embedded model")
    parser.add_argument("--attention", action="store_true", help="only the attention-kernel arms (fresh lengths)")
    args = parser.parse_args()
    import torch

    workload = GPU if torch.cuda.is_available() and not args.tiny else TINY
    new_tokens = args.new_tokens if workload is GPU else 8
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "arms": {}}
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as scratch:
        model_dir, _ = build_random_model(resolve_tokenizer(args.tokenizer), workload.shape, Path(scratch) / "model")
        (run_attention_arms if args.attention else run_arms)(model_dir, workload, new_tokens, report)
    print(json.dumps(report["arms"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def loaded(model_dir: Path, workload):
    """The project's generator on the model, one batch of prompts (texts and token ids), a seeded generator."""
    import torch

    from tao_pipeline.generation.transformers_backend import TransformersGenerator

    generator = TransformersGenerator(model_dir, "profile", dtype="bfloat16", batch_size=workload.sample_batch)
    texts = prompt_table(workload.sample_batch, workload.prompt_words)["prompt"].tolist()
    prompts = [generator.tokenizer(text)["input_ids"] for text in texts]
    return generator, texts, prompts, torch.Generator(device=generator.model.device).manual_seed(0)


def run_arms(model_dir: Path, workload, new_tokens: int, report: dict) -> None:

    from tao_pipeline.generation.decoding import decode
    from tao_pipeline.generation.sampling import choose_tokens

    generator, texts, prompts, seed = loaded(model_dir, workload)
    model, tokenizer = generator.model, generator.tokenizer
    report["attention"] = getattr(model.config, "_attn_implementation", "?")
    samples, rows = workload.samples, workload.sample_batch * workload.samples
    sampled = partial(choose_tokens, greedy=False, temperature=0.8, generator=seed)
    choices = {
        "decode, top-p 0.95 (the sampler)": partial(sampled, top_p=0.95),
        "decode, greedy": partial(choose_tokens, greedy=True, temperature=1.0, top_p=1.0, generator=seed),
        "decode, top_p 1 (plain multinomial)": partial(sampled, top_p=1.0),
    }
    never_stop = {-1}  # every row runs the whole length, as a random model's rows do anyway
    run = partial(decode, model, prompts, samples=samples, max_new_tokens=new_tokens, eos_ids=never_stop, pad_id=0)
    run(choose=choices["decode, greedy"])  # warm-up
    for name, choose in choices.items():
        seconds = timed(lambda choose=choose: run(choose=choose))
        report["arms"][name] = arm(rows * new_tokens, seconds, new_tokens)
        print(name, report["arms"][name], flush=True)
    report["arms"]["transformers generate(), top-p 0.95"] = timed_generate(model, tokenizer, texts, samples, new_tokens)
    report["arms"]["choice alone"] = time_choice_alone(choose_tokens, rows, model)
    report["profile"] = profile_steps(run, choices["decode, top-p 0.95 (the sampler)"])


def run_attention_arms(model_dir: Path, workload, new_tokens: int, report: dict) -> None:
    """The same decode with and without cuDNN's attention, each at key lengths this process has not run yet
    (cuDNN builds and caches a plan per shape), then cuDNN again at lengths it has seen, then the whole sampler."""
    from torch.nn.attention import SDPBackend

    from tao_pipeline.generation import decoding
    from tao_pipeline.generation.base import SamplingParams
    from tao_pipeline.generation.decoding import decode
    from tao_pipeline.generation.sampling import choose_tokens

    generator, _, prompts, seed = loaded(model_dir, workload)
    model = generator.model
    rows = workload.sample_batch * workload.samples
    choose = partial(choose_tokens, greedy=False, temperature=0.8, top_p=0.95, generator=seed)
    run = partial(decode, model, prompts, samples=workload.samples, eos_ids={-1}, pad_id=0, choose=choose)
    run(max_new_tokens=2)  # CUDA context and kernels, two lengths only
    without_cudnn = decoding.DECODE_ATTENTION  # what decoding uses
    everything = [SDPBackend.CUDNN_ATTENTION, *without_cudnn]
    arms = {
        "flash/efficient only, new lengths": (without_cudnn, new_tokens),
        "cuDNN allowed (default), new lengths": (everything, new_tokens),
        "cuDNN allowed (default), lengths seen": (everything, new_tokens),
        "flash/efficient only, lengths seen": (without_cudnn, new_tokens),
    }
    for name, (backends, tokens) in arms.items():
        with decode_attention(backends):
            seconds = timed(lambda tokens=tokens: run(max_new_tokens=tokens))
        report["arms"][name] = arm(rows * tokens, seconds, tokens)
        print(name, report["arms"][name], flush=True)
    params = SamplingParams(workload.samples, workload.new_tokens, 0.8, 0.95)
    whole = prompt_table(2 * workload.sample_batch, workload.prompt_words + 7)  # other lengths again
    for name, backends in (("sampler, flash/efficient only", without_cudnn), ("sampler, default", everything)):
        part = whole.iloc[: workload.sample_batch] if "only" in name else whole.iloc[workload.sample_batch :]
        before = replace(generator.stats)
        with decode_attention(backends):
            generator.generate(part, params, progress=False)
        tokens, seconds = generator.stats.new_tokens - before.new_tokens, generator.stats.seconds - before.seconds
        report["arms"][name + f", {workload.new_tokens} new tokens"] = arm(tokens, seconds, workload.new_tokens)
        print(name, report["arms"][name + f", {workload.new_tokens} new tokens"], flush=True)


@contextmanager
def decode_attention(backends):
    """The decode loop's attention kernels (generation/decoding.py picks them inside each forward, so an
    outer ``sdpa_kernel`` would be overridden): these ones, in this order of priority, for the block."""
    from tao_pipeline.generation import decoding

    chosen = decoding.DECODE_ATTENTION
    decoding.DECODE_ATTENTION = backends
    try:
        yield
    finally:
        decoding.DECODE_ATTENTION = chosen


def timed(work) -> float:
    import torch

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    work()
    synchronize()
    return time.perf_counter() - started


def arm(tokens: int, seconds: float, steps: int) -> dict:
    return {"tok/s": round(tokens / seconds), "ms/step": round(1000 * seconds / steps, 2), "seconds": round(seconds, 2)}


def timed_generate(model, tokenizer, texts: list[str], samples: int, new_tokens: int) -> dict:
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    settings = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": samples}
    settings |= {"min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": tokenizer.pad_token_id}
    model.generate(**inputs, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    seconds = timed(lambda: model.generate(**inputs, **settings))
    result = arm(len(texts) * samples * new_tokens, seconds, new_tokens)
    print("generate()", result, flush=True)
    return result


def time_choice_alone(choose_tokens, rows: int, model) -> dict:
    import torch

    vocabulary = model.config.vocab_size
    figures, calls = {}, 30
    for name, scale in (("random-model logits", 1.0), ("peaked logits", 12.0)):
        logits = torch.randn(rows, vocabulary, device=model.device, dtype=torch.bfloat16) * scale
        seed = torch.Generator(device=model.device).manual_seed(0)
        choose = partial(choose_tokens, greedy=False, temperature=0.8, top_p=0.95, generator=seed)
        choose(logits)
        seconds = timed(lambda choose=choose, logits=logits: [choose(logits) for _ in range(calls)])
        figures[name] = {"ms/call": round(1000 * seconds / calls, 2)}
    print("choice alone", figures, flush=True)
    return figures


def profile_steps(run, choose) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        run(choose=choose, max_new_tokens=16)
    averages = profiler.key_averages()
    tables = {"by CPU": averages.table(sort_by="cpu_time_total", row_limit=18)}
    if torch.cuda.is_available():
        tables["by GPU"] = averages.table(sort_by="cuda_time_total", row_limit=12)
    for title, table in tables.items():
        print(f"\nprofile, 16 decode steps, {title}:\n{table}", flush=True)
    return tables


if __name__ == "__main__":
    main()

"""GPU check: sampling tokens/s, DPO (LoRA, full) and GRPO steps/s and peak memory, through the project's own code.

A randomly initialised ~0.5B Llama-style model with the embedded model's tokenizer (no weights, no
network) goes through the pipeline's sampler (TransformersGenerator, bf16), train_dpo with LoRA and
with full fine-tuning, and train_grpo, each phase with a bounded workload and a time limit so the
whole check ends in under 8 minutes on one H200. It prints one markdown table and, with --json,
writes the same figures (after every phase, so a killed run still leaves the finished ones).
Without CUDA (or with --tiny) a tiny model and workload run instead, which is what CI runs.

For a CUDA machine with torch, transformers, peft and accelerate but no network (README "GPU check"),
`make gpu-wheels` packs, here, the other wheels it needs (bench/gpu_image_packages.txt lists what that
machine has) and the tokenizer into .whl/; `make gpu-check`, there, installs them into /tmp/site and runs

    python3 bench/gpu_check.py [--tiny] [--tokenizer DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
PACKED_TOKENIZER = WHEEL_DIR / "tokenizer"  # where `make gpu-wheels` puts the embedded tokenizer
VERSIONS_SHOWN = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


@dataclass(frozen=True)
class Shape:
    """The random model: Llama-style with grouped-query attention."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Workload:
    """How much each phase does, and how long it may take (seconds) before it is stopped."""

    shape: Shape
    sample_prompts: int
    sample_batch: int  # prompts per generate() call
    samples: int
    new_tokens: int
    prompt_words: int
    response_words: int
    dpo_steps: int
    grpo_steps: int
    grpo_completion_tokens: int
    phase_limit_s: dict[str, int]


# ~0.47B parameters (untied 49k embeddings + 24 layers of 15.2M). Sized from FLOPs for an H200: a DPO step
# (4 pairs = 8 sequences of ~480 tokens, policy forward+backward and reference forward) is ~14 TFLOP, well
# under 0.5 s even at 5% of the ~790 TFLOP/s bf16 peak; sampling and GRPO decode one forward per new token,
# bound by launch overhead at ~10-40 ms a step whatever the batch, so 2 x 512 and 8 x 256 decode steps take
# under a minute each. The limits add up to 6.25 min; with the imports and the model build the check stays
# under 8 minutes even if every phase runs into its limit.
GPU = Workload(
    shape=Shape(hidden=1024, layers=24, intermediate=4096, heads=16, kv_heads=4),
    sample_prompts=32,
    sample_batch=16,
    samples=8,
    new_tokens=512,
    prompt_words=40,
    response_words=400,
    dpo_steps=40,
    grpo_steps=8,
    grpo_completion_tokens=256,
    phase_limit_s={"sampling": 90, "dpo_lora": 75, "dpo_full": 90, "grpo": 120},
)
TINY = Workload(
    shape=Shape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2),
    sample_prompts=4,
    sample_batch=2,
    samples=2,
    new_tokens=8,
    prompt_words=8,
    response_words=16,
    dpo_steps=2,
    grpo_steps=1,
    grpo_completion_tokens=8,
    phase_limit_s={"sampling": 60, "dpo_lora": 90, "dpo_full": 90, "grpo": 90},
)


@dataclass
class Phase:
    name: str
    workload: str
    dtype: str
    value: float | None = None  # tokens/s or steps/s
    unit: str = ""
    seconds: float = 0.0  # the whole phase: load, run, save
    peak_memory_gib: float | None = None
    status: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)


class PhaseTimeout(Exception):
    pass


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO))  # on a bare GPU machine the project is not installed: run it from the tree
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(variable, "1")  # nothing here needs the hub; without a network a lookup would hang
    report = run_check(args.tiny, args.tokenizer, args.json, args.phases)
    print()
    print(markdown_table(report))
    if any(phase["status"] != "ok" for phase in report["phases"]):
        sys.exit(1)


def run_check(
    tiny: bool, tokenizer: Path | None, json_path: Path | None, only: list[str] | None = None
) -> dict[str, Any]:
    """Every phase in turn on a fresh random model; the report is rewritten to ``json_path`` after each."""
    import torch

    cuda = torch.cuda.is_available()
    workload = GPU if cuda and not tiny else TINY
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device_name(),
        "cuda": cuda,
        "tiny": workload is TINY,
        "versions": versions(),
        "phases": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        tokenizer_dir = resolve_tokenizer(tokenizer)
        model_dir, model = build_random_model(tokenizer_dir, workload.shape, Path(scratch) / "model")
        report["model"] = {**model, "tokenizer": str(tokenizer_dir)}
        print(f"{report['device']}: {describe_model(report['model'])}", flush=True)
        for name, measure in phases(workload).items():
            if only and name not in only:
                continue
            phase = run_phase(name, measure, model_dir, Path(scratch) / name, workload.phase_limit_s[name])
            report["phases"].append(asdict(phase))
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
            report["distributions"] = imported_distributions()
            write_json(json_path, report)
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model and workload (always so without CUDA)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a tokenizer folder (default: .whl/tokenizer, else the bootstrapped embedded model)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument(
        "--phases", nargs="+", choices=list(phases(TINY)), help="run only these phases (default: all of them)"
    )
    return parser.parse_args()


def resolve_tokenizer(given: Path | None) -> Path:
    if given is not None:
        return given
    if (PACKED_TOKENIZER / "tokenizer_config.json").is_file():
        return PACKED_TOKENIZER
    from tao_pipeline.registry.embedded import EMBEDDED_NAME

    home = Path(os.environ.get("TAO_HOME", "~/.tao")).expanduser()
    embedded = home / "models" / "base" / EMBEDDED_NAME
    if (embedded / "tokenizer_config.json").is_file():
        return embedded
    raise SystemExit(f"no tokenizer: run `make gpu-wheels` (it packs one into {PACKED_TOKENIZER}) or pass --tokenizer")


def build_random_model(tokenizer_dir: Path, shape: Shape, model_dir: Path) -> tuple[Path, dict[str, int]]:
    """A randomly initialised Llama with the tokenizer's vocabulary, saved as the project's loaders expect."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from tao_pipeline.registry.loading import load_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising on the GPU takes a second
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    description = {"parameters": model.num_parameters(), "vocab": config.vocab_size, **asdict(shape)}
    del model
    release_memory()
    return model_dir, description


def describe_model(model: dict[str, Any]) -> str:
    return (
        f"random Llama-style model, {model['parameters'] / 1e6:,.0f}M parameters (hidden {model['hidden']}, "
        f"{model['layers']} layers, MLP {model['intermediate']}, {model['heads']} heads / {model['kv_heads']} KV, "
        f"vocab {model['vocab']:,})"
    )


def phases(workload: Workload) -> dict[str, Callable[[Path, Path], Phase]]:
    return {
        "sampling": lambda model, out: measure_sampling(model, workload),
        "dpo_lora": lambda model, out: measure_dpo(model, out, workload, use_lora=True),
        "dpo_full": lambda model, out: measure_dpo(model, out, workload, use_lora=False),
        "grpo": lambda model, out: measure_grpo(model, out, workload),
    }


def run_phase(name: str, measure: Callable[[Path, Path], Phase], model_dir: Path, out: Path, limit_s: int) -> Phase:
    """One phase under its time limit; a failure or timeout is recorded and the next phase still runs."""
    import torch

    print(f"[{name}] started (limit {limit_s} s)", flush=True)
    release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with time_limit(limit_s), peak_rss() as rss:
            phase = measure(model_dir, out)
    except Exception as error:  # noqa: BLE001 - one failed phase must not cost the others' figures
        message = " ".join(str(error).split()).replace("|", "/")[:200]  # one line that keeps the table a table
        phase = Phase(name, "-", "-", status=f"{type(error).__name__}: {message}")
        if not isinstance(error, PhaseTimeout):
            traceback.print_exc()
    phase.seconds = round(time.perf_counter() - started, 1)
    phase.peak_memory_gib = round(
        (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss.peak_bytes) / 2**30, 2
    )
    release_memory(out)
    print(f"[{name}] {phase.status}: {format_value(phase)} in {phase.seconds} s", flush=True)
    return phase


def measure_sampling(model_dir: Path, workload: Workload) -> Phase:
    from tao_pipeline.generation.base import SamplingParams
    from tao_pipeline.generation.transformers_backend import TransformersGenerator
    from tao_pipeline.settings import GenerationSettings

    defaults = GenerationSettings()
    generator = TransformersGenerator(model_dir, "gpu-check", dtype="bfloat16", batch_size=workload.sample_batch)
    params = SamplingParams(workload.samples, workload.new_tokens, defaults.temperature, defaults.top_p)
    prompts = prompt_table(workload.sample_prompts, workload.prompt_words)
    generator.generate(prompts.head(1), SamplingParams(1, 4), progress=False)  # warm-up: CUDA context, kernels
    warm_up = replace(generator.stats)
    status = "ok"
    try:
        generator.generate(prompts, params, progress=False)
    except PhaseTimeout as timeout:  # the batches that finished still give a figure
        done = generator.stats.prompts - warm_up.prompts
        if not done:
            raise
        status = f"PhaseTimeout: {timeout}; tok/s from the {done} prompts done"
    tokens = generator.stats.new_tokens - warm_up.new_tokens
    seconds = generator.stats.seconds - warm_up.seconds
    return Phase(
        "sampling",
        f"{len(prompts)} prompts x {params.num_samples} samples x {params.max_new_tokens} new tokens, "
        f"batch {workload.sample_batch} prompts",
        "bf16",
        value=tokens / seconds,
        unit="tok/s",
        status=status,
        details={"new_tokens": tokens, "generate_seconds": round(seconds, 2)},
    )


def measure_dpo(model_dir: Path, out: Path, workload: Workload, *, use_lora: bool) -> Phase:
    from tao_pipeline.settings import TrainingSettings
    from tao_pipeline.training.dpo import train_dpo

    settings = TrainingSettings(use_lora=use_lora, max_steps=workload.dpo_steps)
    pairs = pair_table(settings.batch_size * workload.dpo_steps, workload)
    result = train_dpo(model_dir, pairs, settings, out, progress=False)
    tuning = f"LoRA r={settings.lora_r}" if use_lora else "full fine-tuning"
    return training_phase(
        "dpo_lora" if use_lora else "dpo_full",
        f"{plural(result.steps, 'step')} x {settings.batch_size} pairs of {workload.prompt_words}-word prompts and "
        f"{workload.response_words}-word responses, {tuning}",
        settings,
        result,
    )


def measure_grpo(model_dir: Path, out: Path, workload: Workload) -> Phase:
    from tao_pipeline.scoring import build_scorer
    from tao_pipeline.settings import GrpoSettings, ScoringSettings, TrainingSettings
    from tao_pipeline.training.grpo import train_grpo

    grpo = GrpoSettings(max_completion_length=workload.grpo_completion_tokens)
    settings = TrainingSettings(method="grpo", max_steps=workload.grpo_steps, grpo=grpo)
    prompts_per_step = settings.batch_size // grpo.num_generations
    prompts = prompt_table(max(prompts_per_step * workload.grpo_steps, 1), workload.prompt_words)
    result = train_grpo(model_dir, prompts, build_scorer(ScoringSettings()), settings, out, progress=False)
    return training_phase(
        "grpo",
        f"{plural(result.steps, 'step')} x {settings.batch_size} completions ({grpo.num_generations} per prompt) x "
        f"{grpo.max_completion_length} tokens, LoRA r={settings.lora_r}, self-consistency reward",
        settings,
        result,
    )


def training_phase(name: str, workload: str, settings, result) -> Phase:
    from tao_pipeline.registry.loading import bf16_supported

    bf16 = bf16_supported() if settings.bf16 is None else settings.bf16
    return Phase(
        name,
        workload,
        "fp32 weights, bf16 autocast" if bf16 else "fp32",
        value=result.steps / result.seconds,
        unit="steps/s",
        details={"steps": result.steps, "train_seconds": round(result.seconds, 2), **result.metrics()},
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


WORDS = "the model answers each question with a short and careful reply about numbers colours cities and time".split()


def words(count: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def prompt_table(count: int, prompt_words: int):
    import pandas as pd

    return pd.DataFrame(
        {
            "prompt_id": [f"p{i:04d}" for i in range(count)],
            "prompt": [f"Question {i}: {words(prompt_words, i)}?" for i in range(count)],
            "system": [None] * count,
            "task": ["general"] * count,
            "constraints": [None] * count,
        }
    )


def pair_table(count: int, workload: Workload):
    prompts = prompt_table(count, workload.prompt_words)
    prompts["chosen"] = [words(workload.response_words, 10_000 + i) for i in range(count)]
    prompts["rejected"] = [words(workload.response_words, 20_000 + i) for i in range(count)]
    return prompts


@contextmanager
def time_limit(seconds: int):
    """Raises PhaseTimeout in this (main) thread after ``seconds``."""

    def expire(signum, frame):
        raise PhaseTimeout(f"stopped after its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def peak_rss():
    from tao_pipeline.common.profiling import PeakMemory

    with PeakMemory() as memory:
        yield memory


def release_memory(*folders: Path) -> None:
    import shutil

    import torch

    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)  # a phase's merged checkpoint: up to 2 GB each
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def imported_distributions() -> dict[str, str]:
    """Every installed distribution this process imported from, with its version: what the check needed."""
    by_module = importlib.metadata.packages_distributions()
    names = {name for module in list(sys.modules) for name in by_module.get(module.partition(".")[0], [])}
    found = {}
    for name in sorted(names, key=str.lower):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a stale mapping; nothing to record
            continue
    return found


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS_SHOWN:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    import torch

    found["torch"] = torch.__version__
    found["python"] = sys.version.split()[0]
    return found


def format_value(phase: Phase | dict) -> str:
    value, unit = (phase.value, phase.unit) if isinstance(phase, Phase) else (phase["value"], phase["unit"])
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}" if unit == "tok/s" else f"{value:.2f} {unit}"


def markdown_table(report: dict[str, Any]) -> str:
    memory = "peak GPU memory" if report["cuda"] else "peak RSS (process)"
    shown = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    lines = [
        f"GPU check, {report['date']}, on {report['device']}{' (tiny workload)' if report['tiny'] else ''}: "
        f"{describe_model(report['model'])}; {shown}. Sampling through TransformersGenerator, training through "
        "train_dpo / train_grpo (steps/s over trainer.train(), first step included; seconds: the whole phase).",
        "",
        f"| phase | workload | dtype | result | seconds | {memory} | status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for phase in report["phases"]:
        lines.append(
            f"| {phase['name']} | {phase['workload']} | {phase['dtype']} | {format_value(phase)} | "
            f"{phase['seconds']:.1f} | {phase['peak_memory_gib']:.2f} GiB | {phase['status']} |"
        )
    lines.append(f"| wall time | the whole check, model build included | | | {report['wall_seconds']:.1f} | | |")
    return "\n".join(lines)


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

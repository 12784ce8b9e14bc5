"""Speed on a busy machine: sampling and DPO steps with 0, 1 and 2 competing busy processes, per thread setting.

The same sampling as a round (the project's decode loop on the embedded model, the demo's prompts and sampling
settings) and the same DPO steps (the demo's training settings on pairs like a round's), each measured in a fresh
child process per thread setting while the competitors run: busy single-threaded processes at nice 0 or nice 19
(other work on the machine, most of it at lower priority). For each competitor load the thread settings run one
after the other, in turn, and the whole sweep repeats ``--repeats`` times; each figure is the median over repeats.

Thread settings (``--settings``, comma-separated):
  torch       torch's own default (its thread count is the machine's cores, whatever this process may use)
  tao         the project's choice: ``common.threads.use_torch_threads(None, ...)``, as generation and training make it
  usable      ``usable_cpus()`` (affinity mask capped by the cgroup quota); ``usable-1``, ``1``, ``2``: the same, fixed
A suffix changes how the pool waits (set before torch loads OpenMP): ``:passive`` (OMP_WAIT_POLICY=PASSIVE: a
thread at a barrier sleeps at once), ``:active`` (it spins), ``:interop1`` (torch.set_num_interop_threads(1)).

Workloads (``--workloads``): ``sample`` (tokens/s), ``dpo`` (s/step after the warm-up steps), and ``barrier``
(small parallel additions per second: nothing but torch's parallel regions, the barrier cost alone).

Prints, per workload, the figure for every setting and load (and the thread counts it ran with), the slowdown
against the same setting alone and against the best setting alone; ``--json`` writes every measurement.

    .venv/bin/python bench/threads.py [--workloads sample,dpo,barrier] [--settings torch,tao,1,torch:passive]
        [--competitors 0,1,2] [--nice 0,19] [--repeats 2] [--prompts 8] [--samples 8] [--max-new-tokens 32]
        [--dpo-steps 4] [--warmup 2] [--pairs 16] [--base-model-from ~/.tao] [--json FILE]

Ends with the slowdown of each setting with one busy process against the best setting alone (the target: 2x at
most). The figures need a machine with nothing else running: the competitors are the only load it may have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import pandas as pd
from common import DEMO, bench_parser, show

HERE = Path(__file__).resolve().parent
# A busy process: one thread, always runnable, at the niceness given.
BUSY_LOOP = "import os, sys\nos.nice(int(sys.argv[1]))\nwhile True:\n    pass\n"
WAIT_POLICIES = {"passive": "PASSIVE", "active": "ACTIVE"}
HIGHER_IS_BETTER = {"sample": True, "dpo": False, "barrier": True}
UNITS = {"sample": "tokens/s", "dpo": "s/step", "barrier": "regions/s"}


@dataclass(frozen=True)
class Load:
    """Competing busy processes: how many, at which niceness."""

    processes: int
    nice: int = 0

    @property
    def name(self) -> str:
        return "alone" if not self.processes else f"{self.processes} busy @ nice {self.nice}"


@contextmanager
def competing(load: Load) -> Iterator[None]:
    """``load.processes`` busy loops for the duration of the block; each is stopped by its own pid afterwards."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(load.nice)]) for _ in range(load.processes)]
    try:
        time.sleep(0.5 if busy else 0)  # let them start spinning
        yield
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()


def loads(counts: list[int], nices: list[int]) -> list[Load]:
    return [Load(0)] + [Load(count, nice) for count in counts if count for nice in nices]


# The child: one workload, one thread setting, in a fresh process (OpenMP reads its wait policy when torch loads).


def child_environment(setting: str) -> dict[str, str]:
    env = dict(os.environ)
    for suffix in setting.split(":")[1:]:
        if suffix in WAIT_POLICIES:
            env["OMP_WAIT_POLICY"] = WAIT_POLICIES[suffix]
        elif suffix != "interop1":
            raise SystemExit(f"--settings: unknown suffix {suffix!r} in {setting!r} (passive, active, interop1)")
    return env


def apply_setting(setting: str) -> dict:
    """Set torch's threads as ``setting`` says; returns what was used and why."""
    import torch

    from tao_pipeline.common.threads import usable_cpus, use_torch_threads

    threads, *suffixes = setting.split(":")
    if "interop1" in suffixes:
        torch.set_num_interop_threads(1)
    if threads == "tao":
        reason = use_torch_threads(None, "threads").reason
    elif threads == "torch":
        reason = "torch's default"
    else:
        fixed = {"usable": usable_cpus(), "usable-1": max(1, usable_cpus() - 1)}.get(threads)
        torch.set_num_threads(fixed if fixed is not None else int(threads))
        reason = threads
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "why": reason,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }


def threads_setting(args) -> int | None:
    """generation.threads / training.threads for the setting under test: None (the project's default) for 'tao',
    else the count the setting gave torch, so that generation and training keep it."""
    import torch

    return None if args.child_setting.split(":")[0] == "tao" else torch.get_num_threads()


def measure_sampling(args, model_path: Path) -> float:
    """Tokens per second of the project's sampler (decode loop) on the demo's train prompts."""
    from tao_pipeline.data.ingest import load_prompts
    from tao_pipeline.generation import SamplingParams
    from tao_pipeline.generation.transformers_backend import TransformersGenerator
    from tao_pipeline.settings import load_settings

    settings = load_settings(DEMO)
    gen = settings.generation
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    prompts = prompts[prompts["split"] == "train"].head(args.prompts)
    sampler = TransformersGenerator(
        model_path, "bench", dtype=settings.model.dtype, batch_size=args.prompts, threads=threads_setting(args)
    )
    sampler.generate(prompts.head(2), SamplingParams(2, 4, gen.temperature, gen.top_p), progress=False)
    sampler.stats.__init__()
    params = SamplingParams(args.samples, args.max_new_tokens, gen.temperature, gen.top_p, seed=gen.seed)
    sampler.generate(prompts, params, progress=False)
    return sampler.stats.tokens_per_second


def measure_dpo(args, model_path: Path) -> float:
    """Seconds per DPO step, the demo's training settings, after ``args.warmup`` untimed steps."""
    import tempfile

    from dpo_step import Run, demo_pairs
    from transformers import TrainerCallback

    from tao_pipeline.settings import load_settings
    from tao_pipeline.training.dpo import train_dpo

    run = Run(warmup=args.warmup)

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            run.step_seconds.append(time.perf_counter() - self.started)

    update = {"max_steps": args.warmup + args.dpo_steps, "threads": threads_setting(args)}
    training = load_settings(DEMO).training.model_copy(update=update)
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        train_dpo(model_path, demo_pairs(args.pairs), training, Path(scratch), progress=False, callbacks=[Clock()])
    return run.seconds_per_step


def measure_barriers(args) -> float:
    """Parallel regions per second: additions just large enough for torch to split them across its threads."""
    import torch

    a, b = torch.ones(1 << 17), torch.ones(1 << 17)
    for _ in range(200):
        torch.add(a, b, out=a)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.barrier_seconds:
        for _ in range(100):
            torch.add(a, b, out=a)
        count += 100
    return count / (time.perf_counter() - started)


def run_child(args) -> None:
    used = apply_setting(args.child_setting)
    model_path = Path(args.model_path) if args.model_path else None
    measure = {
        "sample": lambda: measure_sampling(args, model_path),
        "dpo": lambda: measure_dpo(args, model_path),
        "barrier": lambda: measure_barriers(args),
    }[args.child]
    print(json.dumps({**used, "value": measure()}), flush=True)


# The parent: every load, every setting in turn, every repeat.


def measure_once(args, workload: str, setting: str, model_path: Path | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", workload, "--child-setting", setting]
    command += child_arguments(args) + (["--model-path", str(model_path)] if model_path else [])
    completed = subprocess.run(command, env=child_environment(setting), capture_output=True, text=True, cwd=HERE)
    if completed.returncode != 0:
        raise SystemExit(f"{workload} with {setting} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child_arguments(args) -> list[str]:
    names = ["prompts", "samples", "max_new_tokens", "dpo_steps", "warmup", "pairs", "barrier_seconds"]
    return [part for name in names for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def sweep(args, model_path: Path | None) -> pd.DataFrame:
    rows = []
    for repeat in range(args.repeats):
        for load in loads(args.competitors, args.nice):
            with competing(load):
                for workload in args.workloads:
                    for setting in args.settings:
                        result = measure_once(args, workload, setting, model_path)
                        rows.append(
                            {"repeat": repeat, "workload": workload, "load": load.name, "setting": setting, **result}
                        )
                        print(
                            f"  {workload:<8} {load.name:<17} {setting:<16} threads {result['threads']}: "
                            f"{result['value']:.3f} {UNITS[workload]}",
                            flush=True,
                        )
    return pd.DataFrame(rows)


def summarize(measurements: pd.DataFrame, workload: str) -> pd.DataFrame:
    """Median per (setting, load); slowdown against the same setting alone and against the best setting alone."""
    rows = measurements[measurements["workload"] == workload]
    counts = ("threads", lambda used: "/".join(str(count) for count in sorted(set(used))))
    figures = rows.groupby(["setting", "load"], sort=False).agg(threads=counts, value=("value", median))
    figures = figures.reset_index()
    higher = HIGHER_IS_BETTER[workload]

    def slowdown(value: float, reference: float) -> float:
        return reference / value if higher else value / reference

    alone = figures[figures["load"] == "alone"].set_index("setting")["value"]
    best = alone.max() if higher else alone.min()
    figures["vs same alone"] = [slowdown(v, alone[s]) for s, v in zip(figures["setting"], figures["value"])]
    figures["vs best alone"] = [slowdown(v, best) for v in figures["value"]]
    return figures.rename(columns={"value": UNITS[workload]})


def verdict(summary: pd.DataFrame, workload: str) -> str:
    """The worst slowdown with one busy process (either niceness) against the best setting alone, per setting."""
    one = summary[summary["load"].str.startswith("1 busy")]
    worst = one.groupby("setting", sort=False)["vs best alone"].max()
    shown = ", ".join(f"{setting} {ratio:.2f}x" for setting, ratio in worst.items())
    return f"{workload}: slowdown with one busy process (the worse niceness) vs the best setting alone: {shown}"


def main() -> None:
    parser = bench_parser(__doc__)
    listed = lambda kind: lambda text: [kind(part) for part in text.split(",") if part]  # noqa: E731
    parser.add_argument("--workloads", type=listed(str), default=["sample", "dpo", "barrier"])
    parser.add_argument("--settings", type=listed(str), default=["torch", "tao", "1", "torch:passive"])
    parser.add_argument("--competitors", type=listed(int), default=[0, 1, 2])
    parser.add_argument("--nice", type=listed(int), default=[0, 19])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dpo-steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--barrier-seconds", type=float, default=3.0)
    parser.add_argument("--json", help="Also write every measurement to this file.")
    parser.add_argument("--child", help=argparse_hidden())
    parser.add_argument("--child-setting", help=argparse_hidden())
    parser.add_argument("--model-path", help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    from dpo_step import embedded_model

    from tao_pipeline.common.threads import usable_cpus

    needs_model = any(workload in ("sample", "dpo") for workload in args.workloads)
    model_path = embedded_model(args.base_model_from) if needs_model else None
    print(
        f"{os.cpu_count()} cores, usable_cpus() = {usable_cpus()}, load average {os.getloadavg()[0]:.2f} before; "
        f"sampling {args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} tokens, "
        f"DPO {args.dpo_steps} steps after {args.warmup}, {args.repeats} repeat(s)"
    )
    measurements = sweep(args, model_path)
    verdicts = []
    for workload in args.workloads:
        summary = summarize(measurements, workload)
        show(f"{workload} ({UNITS[workload]}, median of {args.repeats})", summary)
        if any(summary["load"].str.startswith("1 busy")):
            verdicts.append(verdict(summary, workload))
    print("\n" + "\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(measurements.to_json(orient="records", indent=1))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

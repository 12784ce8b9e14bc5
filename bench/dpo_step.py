"""DPO step time: today's computation against the faster one, side by side in one process, on the embedded model.

Both runs train the demo's DPO (LoRA r=16, batch 4, the same learning rate and beta) on the same pairs with the
same seed; only how they compute differs. OLD is how a step computed before: a reference forward in every step,
autocast casting the frozen weights in every forward, the LM head scoring prompt and padding positions too. The
steps alternate, one step of one run then one of the other, so a machine whose load drifts slows both alike.
Prints the step-time ratio after the warm-up steps, the setup time each run spends before its first step (the
new one computes the reference log-probs there, once per round), and both loss curves.

    .venv/bin/python bench/dpo_step.py [--steps 12] [--warmup 2] [--pairs 64] [--pairs-from PAIRS.parquet]
                                       [--base-model-from ~/.tao]
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import pandas as pd
import torch
from common import DEMO, bench_parser
from transformers import TrainerCallback

from tao_pipeline.data.ingest import load_prompts
from tao_pipeline.evaluation.labels import load_labels
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.embedded import EMBEDDED_NAME
from tao_pipeline.settings import TrainingSettings, load_settings
from tao_pipeline.training.dpo import train_dpo
from tao_pipeline.training.pairs import PAIR_COLUMNS

OLD = {"precompute_ref_log_probs": False, "bf16_frozen_weights": False, "score_completions_only": False}


@dataclass
class Run:
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0  # building the trainer (tokenizing; the new run's reference pass)
    warmup: int = 2

    @property
    def seconds_per_step(self) -> float:
        return mean(self.step_seconds[self.warmup :])


@dataclass
class StepComparison:
    old: Run
    new: Run

    @property
    def ratio(self) -> float:
        return self.new.seconds_per_step / self.old.seconds_per_step

    @property
    def max_loss_difference(self) -> float:
        return max(abs(a - b) for a, b in zip(self.old.losses, self.new.losses, strict=True))


class TakeTurns:
    """Two threads that run one at a time, handing over at each step's end: one step of each in turn."""

    def __init__(self):
        self.turn, self.finished = 0, set()
        self.changed = threading.Condition()

    def wait(self, me: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.turn == me)

    def hand_over(self, me: int, *, done: bool = False) -> None:
        with self.changed:
            if done:
                self.finished.add(me)
            if 1 - me not in self.finished:
                self.turn = 1 - me
            self.changed.notify_all()


class StepClock(TrainerCallback):
    """Times each step, then lets the other run take its step."""

    def __init__(self, run: Run, turns: TakeTurns, me: int):
        self.run, self.turns, self.me, self.started = run, turns, me, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.run.step_seconds.append(time.perf_counter() - self.started)
        self.turns.hand_over(self.me)
        self.turns.wait(self.me)


def dpo_step_ratio(
    model_path: Path | str,
    pairs: pd.DataFrame,
    *,
    steps: int = 12,
    warmup: int = 2,
    settings: TrainingSettings | None = None,
    old: dict | None = None,
) -> StepComparison:
    """Old (``settings`` updated with ``old``, default OLD) against new (``settings``), alternating steps.

    ``settings``: the demo's training settings by default; either way max_steps becomes warmup + steps.
    """
    new_settings = (settings or load_settings(DEMO).training).model_copy(update={"max_steps": warmup + steps})
    configurations = [new_settings.model_copy(update=OLD if old is None else old), new_settings]
    runs = [Run(warmup=warmup), Run(warmup=warmup)]
    turns, errors = TakeTurns(), []

    def train(me: int, scratch: str) -> None:
        turns.wait(me)
        try:
            clock = StepClock(runs[me], turns, me)
            result = train_dpo(
                model_path, pairs, configurations[me], Path(scratch) / str(me), progress=False, callbacks=[clock]
            )
            runs[me].losses, runs[me].setup_seconds = result.series("loss"), result.setup_seconds
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)
        finally:
            turns.hand_over(me, done=True)

    with tempfile.TemporaryDirectory(prefix="dpo-step-") as scratch:
        threads = [threading.Thread(target=train, args=(me, scratch)) for me in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return StepComparison(*runs)


def fp32_losses(model_path: Path | str, pairs: pd.DataFrame, steps: int) -> list[float]:
    """Today's computation in fp32 (no autocast): the loss curve that rounding alone moves away from."""
    today = load_settings(DEMO).training.model_copy(update={**OLD, "bf16": False, "max_steps": steps})
    with tempfile.TemporaryDirectory(prefix="dpo-step-fp32-") as scratch:
        return train_dpo(model_path, pairs, today, Path(scratch), progress=False).series("loss")


def demo_pairs(count: int) -> pd.DataFrame:
    """Pairs from the demo's logs and labels: chosen = the labelled answer in a sentence, rejected = a hedging
    answer with the label of the previous prompt of the same task (lengths like a round's pairs)."""
    settings = load_settings(DEMO)
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    labels = load_labels(settings.data.labels)
    rows = prompts[prompts["prompt"].isin(labels.keys())].head(count).reset_index(drop=True)
    rows["answer"] = [labels[prompt][0] for prompt in rows["prompt"]]
    wrong = rows.groupby("task")["answer"].transform(lambda answers: answers.shift(1).fillna(answers.iloc[-1]))
    pairs = pd.DataFrame(
        {
            "pair_id": [f"pair-{i}" for i in range(len(rows))],
            "prompt_id": [f"prompt-{i}" for i in range(len(rows))],
            "prompt": rows["prompt"],
            "system": rows["system"].astype(object).where(rows["system"].notna(), None),
            "history": rows["history"].astype(object).where(rows["history"].notna(), None),
            "task": rows["task"],
            "chosen_response_id": [f"c{i}" for i in range(len(rows))],
            "rejected_response_id": [f"r{i}" for i in range(len(rows))],
            "chosen": "The answer is " + rows["answer"].astype(str) + ".",
            "rejected": "I am not completely sure, but I think it might be "
            + wrong.astype(str)
            + ". Let me know if you would like me to explain it in more detail!",
            "chosen_score": 1.0,
            "rejected_score": 0.0,
            "margin": 1.0,
        }
    )
    return pairs[PAIR_COLUMNS].reset_index(drop=True)


def embedded_model(base_model_from: str | None) -> Path:
    """The converted embedded model: from ``--base-model-from`` (a TAO home or the model folder), else this home's."""
    if base_model_from:
        source = Path(base_model_from).expanduser()
        for candidate in (source, source / "models" / "base" / EMBEDDED_NAME):
            if (candidate / "model.safetensors").is_file():
                return candidate
        raise SystemExit(f"--base-model-from {base_model_from}: no converted {EMBEDDED_NAME} there")
    settings = load_settings(DEMO)
    return Path(ModelStore(settings.models_dir).resolve_base(settings.model)[1])


def report(comparison: StepComparison, steps: int, warmup: int) -> None:
    old, new = comparison.old, comparison.new
    print(
        f"DPO step time: new/old = {comparison.ratio:.2f} "
        f"(old {old.seconds_per_step:.2f} s/step, new {new.seconds_per_step:.2f} s/step; "
        f"mean of {steps} steps after {warmup} warm-up steps)"
    )
    print(f"setup before the first step: old {old.setup_seconds:.1f} s, new {new.setup_seconds:.1f} s")
    print(f"\n{'step':>4}  {'old loss':>9}  {'new loss':>9}  {'old s':>6}  {'new s':>6}")
    for step, (a, b, ta, tb) in enumerate(zip(old.losses, new.losses, old.step_seconds, new.step_seconds), 1):
        print(f"{step:>4}  {a:>9.4f}  {b:>9.4f}  {ta:>6.2f}  {tb:>6.2f}")
    print(f"max |old loss - new loss| over {len(old.losses)} steps: {comparison.max_loss_difference:.4f}")


def round_estimate(comparison: StepComparison, pair_count: int) -> float:
    """New/old time of a whole DPO run on ``pair_count`` pairs with the demo's epochs, setup included."""
    training = load_settings(DEMO).training
    steps = math.ceil(pair_count / training.batch_size) * training.epochs
    old, new = comparison.old, comparison.new
    old_seconds = old.setup_seconds + steps * old.seconds_per_step
    new_seconds = new.setup_seconds + steps * new.seconds_per_step
    print(
        f"a whole DPO run on these {pair_count} pairs ({training.epochs:g} epochs = {steps:g} steps, setup included): "
        f"new/old = {new_seconds / old_seconds:.2f} (old {old_seconds:.0f} s, new {new_seconds:.0f} s)"
    )
    return new_seconds / old_seconds


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=12, help="Timed steps of each run.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--pairs-from", help="A round's preference_pairs parquet (lake/preference_pairs/*.parquet).")
    parser.add_argument(
        "--noise",
        action="store_true",
        help="Also today's computation in fp32 against bf16: how far rounding alone moves the loss.",
    )
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    pairs = pd.read_parquet(args.pairs_from).head(args.pairs) if args.pairs_from else demo_pairs(args.pairs)
    model = embedded_model(args.base_model_from)
    print(f"{model.name}, {len(pairs)} pairs, torch threads {torch.get_num_threads()}; old: {OLD}, new: the defaults")
    comparison = dpo_step_ratio(model, pairs, steps=args.steps, warmup=args.warmup)
    report(comparison, args.steps, args.warmup)
    figures = {"ratio": comparison.ratio, "old": vars(comparison.old), "new": vars(comparison.new)}
    figures["whole_run_ratio"] = round_estimate(comparison, len(pairs))
    if args.noise:
        reference = fp32_losses(model, pairs, len(comparison.old.losses))
        print(f"\nnoise: today's computation in fp32, no autocast\n{'step':>4}  {'fp32':>9}  {'old':>9}  {'new':>9}")
        for step, losses in enumerate(zip(reference, comparison.old.losses, comparison.new.losses, strict=True), 1):
            print(f"{step:>4}  " + "  ".join(f"{loss:>9.4f}" for loss in losses))
        gap = max(abs(a - b) for a, b in zip(reference, comparison.old.losses, strict=True))
        print(f"max |fp32 loss - old loss|: {gap:.4f}")
        figures["fp32_losses"], figures["noise_max_loss_difference"] = reference, gap
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

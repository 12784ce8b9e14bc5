"""The callbacks every TRL trainer here gets: torch's threads following the load, and a progress bar."""

from __future__ import annotations

from collections import Counter

from tqdm.auto import tqdm
from transformers import TrainerCallback

from tao_pipeline.common.threads import ThreadChoice, use_torch_threads


class ThreadsFollowTheLoad(TrainerCallback):
    """torch's threads for training (``training.threads``), chosen before the trainer is built and again before
    each step: unset, the pool follows the CPUs other processes leave free (measured at most every few seconds)."""

    def __init__(self, setting: int | None):
        self.setting = setting
        self.steps: Counter[int] = Counter()
        self.latest = self.choose()

    def choose(self) -> ThreadChoice:
        self.latest = use_torch_threads(self.setting, "training.threads")
        return self.latest

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps[self.choose().threads] += 1

    def used(self) -> dict[str, int | str]:
        """The thread count most steps ran with, and why (the latest choice's reason, and other counts used)."""
        if not self.steps:
            return self.latest.metadata()
        threads = self.steps.most_common(1)[0][0]
        others = sorted(set(self.steps) - {threads})
        why = self.latest.reason + (f"; some steps ran with {others} as the load changed" if others else "")
        return ThreadChoice(threads, why).metadata()


class LossProgressBar(TrainerCallback):
    """A progress bar with the live loss (and DPO's reward margin), instead of a printed dict per step."""

    def __init__(self, desc: str = "dpo"):
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            margin = {"margin": f"{logs['rewards/margins']:.3f}"} if "rewards/margins" in logs else {}
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", **margin)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

"""The training methods, in one dispatch table used in-process and by the accelerate worker alike.

- ``dpo``: DPO on the round's preference pairs (the default);
- ``grpo``: GRPO on the round's train prompts, with the round's own scorer as the reward;
- ``control``: the control arm, the same DPO run with each pair's direction flipped at random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from tao_pipeline.scoring import build_scorer
from tao_pipeline.settings import TaoSettings
from tao_pipeline.training.pairs import shuffle_directions
from tao_pipeline.training.trainer import TrainingResult


@dataclass(frozen=True)
class TrainingJob:
    """One training run: which method, from which model, on what, into which folder."""

    method: str
    parent_path: Path | str
    output_dir: Path
    settings: TaoSettings
    pairs: pd.DataFrame | None = None  # dpo, control
    prompts: pd.DataFrame | None = None  # grpo
    progress: bool = True

    def into(self, output_dir: Path) -> TrainingJob:
        return replace(self, output_dir=output_dir)


def _dpo(job: TrainingJob) -> TrainingResult:
    from tao_pipeline.training.dpo import train_dpo  # TRL and torch load in the process that trains, only

    return train_dpo(
        job.parent_path,
        job.pairs,
        job.settings.training,
        job.output_dir,
        trust_remote_code=job.settings.model.trust_remote_code,
        progress=job.progress,
    )


def _grpo(job: TrainingJob) -> TrainingResult:
    if job.prompts is None:
        raise ValueError("training.method='grpo' needs the round's train prompts")
    from tao_pipeline.training.grpo import train_grpo

    scorer = build_scorer(job.settings.scoring, job.settings.cache_dir)
    return train_grpo(
        job.parent_path,
        job.prompts,
        scorer,
        job.settings.training,
        job.output_dir,
        trust_remote_code=job.settings.model.trust_remote_code,
        progress=job.progress,
    )


def _control(job: TrainingJob) -> TrainingResult:
    return _dpo(replace(job, pairs=shuffle_directions(job.pairs, job.settings.training.seed)))


METHODS: dict[str, Callable[[TrainingJob], TrainingResult]] = {"dpo": _dpo, "grpo": _grpo, "control": _control}


def run_training(job: TrainingJob) -> TrainingResult:
    """Train ``job`` in this process with its method and save the checkpoint into ``job.output_dir``."""
    if job.method not in METHODS:
        raise ValueError(f"unknown training method {job.method!r}; known: {sorted(METHODS)}")
    return METHODS[job.method](job)

"""A round's checkpoint: train with the configured method, save it atomically, register it.

With ``training.accelerate_config`` set, training runs under `accelerate launch` (multi-GPU,
DeepSpeed) through :mod:`.distributed`; otherwise in this process. Either way the method comes
from the one dispatch table in :mod:`.methods`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.common.atomic import atomic_directory
from tao_pipeline.common.hashing import content_hash
from tao_pipeline.registry.store import ModelStore, ModelVersion
from tao_pipeline.settings import TaoSettings, TrainingSettings
from tao_pipeline.training.distributed import launch, write_job
from tao_pipeline.training.methods import TrainingJob, run_training
from tao_pipeline.training.trainer import TrainingResult

JOB_FOLDER = ".job"
CONTROL_COLUMNS = ["round", "enabled", "version_id", "parent_version", "path", "log_history"]


@dataclass
class RoundCheckpoint:
    """A round's trained checkpoint and its row of the tuned_checkpoint (or control_checkpoint) table."""

    record: pd.DataFrame  # one row: version, parent, path, lineage (pair and prompt ids), training log, metrics
    result: TrainingResult | None  # None for a control arm that is off
    trained_on: str  # e.g. "120 pairs (DPO)"


def checkpoint_version_id(round_id: str, parent_version: str, pair_ids: list[str], settings: TrainingSettings) -> str:
    """Deterministic: the same parent, pairs and hyperparameters give the same version id.

    How many threads compute it is not a hyperparameter, and an empty TRL table is as if absent (so ids made
    before those settings existed stay the same).
    """
    empty_tables = {name for name in ("dpo_args", "grpo_args") if not getattr(settings, name)}
    hyperparameters = settings.model_dump_json(exclude={"threads", *empty_tables})
    digest = content_hash(parent_version, ",".join(sorted(pair_ids)), hyperparameters)
    return f"{round_id}-{settings.method}-{digest[:8]}"


def tune_checkpoint(
    store: ModelStore,
    parent: ModelVersion,
    pairs: pd.DataFrame,
    settings: TaoSettings,
    round_id: str,
    *,
    prompts: pd.DataFrame | None = None,
    progress: bool = True,
) -> tuple[ModelVersion, TrainingResult]:
    """Train (DPO on the pairs, or GRPO on the prompts with the round's scorer as reward), store, register."""
    training = settings.training
    grpo = training.method == "grpo"
    if grpo and prompts is None:
        raise ValueError("training.method='grpo' needs the round's train prompts")
    source_ids = prompts["prompt_id"].tolist() if grpo else pairs["pair_id"].tolist()
    version_id = checkpoint_version_id(round_id, parent.version_id, source_ids, training)
    job = TrainingJob(
        training.method,
        parent.path,
        store.checkpoint_dir(version_id),
        settings,
        pairs,
        prompts if grpo else None,
        progress,
    )
    result = train_into_place(job)
    trained_on = {"prompts": len(prompts)} if grpo else {"pairs": len(pairs)}
    version = store.register(
        version_id,
        job.output_dir,
        parent_version=parent.version_id,
        round_id=round_id,
        method=f"{training.method}+lora" if training.use_lora else training.method,
        hyperparameters=training.model_dump(),
        metrics={**result.metrics(), **trained_on},
    )
    return version, result


def train_control(
    parent: ModelVersion,
    pairs: pd.DataFrame,
    settings: TaoSettings,
    round_id: str,
    progress: bool = True,
) -> tuple[str, Path, TrainingResult]:
    """The control arm: the same DPO run on the same pairs with random preference directions.

    Saved under models/controls/, outside the registry, so a control can never be promoted.
    """
    version_id = "control-" + checkpoint_version_id(
        round_id, parent.version_id, pairs["pair_id"].tolist(), settings.training
    )
    job = TrainingJob("control", parent.path, settings.controls_dir / version_id, settings, pairs, None, progress)
    return version_id, job.output_dir, train_into_place(job)


def train_into_place(job: TrainingJob) -> TrainingResult:
    """Train into a temp folder beside ``job.output_dir`` and rename it into place when done."""
    results: list[TrainingResult] = []

    def train(staging: Path) -> None:
        accelerate_config = job.settings.training.accelerate_config
        if accelerate_config is None:
            results.append(run_training(job.into(staging)))
            return
        job_file = write_job(staging / JOB_FOLDER, job.into(staging))
        results.append(launch(job_file, accelerate_config))
        shutil.rmtree(staging / JOB_FOLDER)

    atomic_directory(job.output_dir, train)
    return results[0]


def tune_round(
    models: ModelStore,
    parent_version: str,
    pairs: pd.DataFrame,
    train_prompts: pd.DataFrame,
    settings: TaoSettings,
    round_id: str,
) -> RoundCheckpoint:
    """The round's challenger, tuned from the model that wrote its candidates, with its lineage.

    DPO learns from the pairs; GRPO from the train prompts directly, with the round's scorer as reward.
    """
    grpo = settings.training.method == "grpo"
    version, result = tune_checkpoint(
        models, models.get(parent_version), pairs, settings, round_id, prompts=train_prompts if grpo else None
    )
    record = {
        "version_id": version.version_id,
        "parent_version": parent_version,
        "round": round_id,
        "method": version.method,
        "path": str(version.path),
        "pair_ids": [] if grpo else pairs["pair_id"].tolist(),
        "prompt_ids": train_prompts["prompt_id"].tolist() if grpo else pairs["prompt_id"].tolist(),
        "log_history": json.dumps(result.log_history),
        **result.metrics(),
    }
    trained_on = f"{len(train_prompts)} prompts (GRPO)" if grpo else f"{len(pairs)} pairs (DPO)"
    return RoundCheckpoint(pd.DataFrame([record]), result, trained_on)


def control_round(
    models: ModelStore, parent_version: str, pairs: pd.DataFrame, settings: TaoSettings, round_id: str
) -> RoundCheckpoint:
    """The round's control arm (evaluation.control_arm), or a record saying it is off."""
    if not settings.evaluation.control_arm:
        off = {
            "round": round_id,
            "enabled": False,
            "version_id": None,
            "parent_version": None,
            "path": None,
            "log_history": "[]",
        }
        return RoundCheckpoint(pd.DataFrame([off], columns=CONTROL_COLUMNS), None, "")
    version_id, path, result = train_control(models.get(parent_version), pairs, settings, round_id)
    record = {
        "round": round_id,
        "enabled": True,
        "version_id": version_id,
        "parent_version": parent_version,
        "path": str(path),
        "log_history": json.dumps(result.log_history),
    }
    trained_on = f"{len(pairs)} pairs, each direction flipped with probability 1/2"
    return RoundCheckpoint(pd.DataFrame([record], columns=CONTROL_COLUMNS), result, trained_on)

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
from tao_pipeline.registry.policy import starting_weights
from tao_pipeline.registry.store import ModelStore, ModelVersion
from tao_pipeline.settings import TaoSettings, TrainingSettings
from tao_pipeline.training.distributed import launch, write_job
from tao_pipeline.training.methods import TrainingJob, run_training
from tao_pipeline.training.trainer import TrainingResult

JOB_FOLDER = ".job"
CONTROL_COLUMNS = ["round", "enabled", "version_id", "parent_version", "weights_from", "path", "log_history"]


@dataclass
class RoundCheckpoint:
    """A round's trained checkpoint and its row of the tuned_checkpoint (or control_checkpoint) table."""

    record: pd.DataFrame  # one row: version, parent, path, lineage (pair and prompt ids), training log, metrics
    result: TrainingResult | None  # None for a control arm that is off
    trained_on: str  # e.g. "120 pairs (DPO)"


def checkpoint_version_id(
    round_id: str,
    parent_version: str,
    pair_ids: list[str],
    settings: TrainingSettings,
    weights_from: str | None = None,
) -> str:
    """Deterministic: the same parent, starting weights, pairs and hyperparameters give the same version id.

    How many threads compute it is not a hyperparameter, an empty TRL table is as if absent, and weights that
    are the parent's are not named apart (so ids made before those settings existed stay the same).
    """
    empty_tables = {name for name in ("dpo_args", "grpo_args") if not getattr(settings, name)}
    hyperparameters = settings.model_dump_json(exclude={"threads", *empty_tables})
    other_weights = [weights_from] if weights_from not in (None, parent_version) else []
    digest = content_hash(parent_version, *other_weights, ",".join(sorted(pair_ids)), hyperparameters)
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
    weights: ModelVersion | None = None,
) -> tuple[ModelVersion, TrainingResult]:
    """Train (DPO on the pairs, or GRPO on the prompts with the round's scorer as reward), store, register.

    ``parent`` is the model the checkpoint is built on (its round's candidates, its gate's champion);
    training starts from ``weights`` (default: the parent's), recorded as ``weights_from`` when they differ.
    """
    training = settings.training
    grpo = training.method == "grpo"
    if grpo and prompts is None:
        raise ValueError("training.method='grpo' needs the round's train prompts")
    weights = weights or parent
    source_ids = prompts["prompt_id"].tolist() if grpo else pairs["pair_id"].tolist()
    version_id = checkpoint_version_id(round_id, parent.version_id, source_ids, training, weights.version_id)
    job = TrainingJob(
        training.method,
        weights.path,
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
        hyperparameters=training.model_dump() | _weights_note(parent, weights),
        metrics={**result.metrics(), **trained_on},
    )
    return version, result


def _weights_note(parent: ModelVersion, weights: ModelVersion) -> dict[str, str]:
    return {"weights_from": weights.version_id} if weights.version_id != parent.version_id else {}


def train_control(
    parent: ModelVersion,
    pairs: pd.DataFrame,
    settings: TaoSettings,
    round_id: str,
    progress: bool = True,
    weights: ModelVersion | None = None,
) -> tuple[str, Path, TrainingResult]:
    """The control arm: the same DPO run on the same pairs, from the same weights, with random preference
    directions.

    Saved under models/controls/, outside the registry, so a control can never be promoted.
    """
    weights = weights or parent
    version_id = "control-" + checkpoint_version_id(
        round_id, parent.version_id, pairs["pair_id"].tolist(), settings.training, weights.version_id
    )
    job = TrainingJob("control", weights.path, settings.controls_dir / version_id, settings, pairs, None, progress)
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
    """The round's challenger, built on the model that wrote its candidates (tuned from its weights, or from the
    base model's with flywheel.start_from = "base"), with its lineage.

    DPO learns from the pairs; GRPO from the train prompts directly, with the round's scorer as reward.
    """
    grpo = settings.training.method == "grpo"
    weights = starting_weights(models, parent_version, settings.flywheel.start_from)
    version, result = tune_checkpoint(
        models,
        models.get(parent_version),
        pairs,
        settings,
        round_id,
        prompts=train_prompts if grpo else None,
        weights=weights,
    )
    record = {
        "version_id": version.version_id,
        "parent_version": parent_version,
        "weights_from": weights.version_id,
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
            "weights_from": None,
            "path": None,
            "log_history": "[]",
        }
        return RoundCheckpoint(pd.DataFrame([off], columns=CONTROL_COLUMNS), None, "")
    weights = starting_weights(models, parent_version, settings.flywheel.start_from)
    version_id, path, result = train_control(models.get(parent_version), pairs, settings, round_id, weights=weights)
    record = {
        "round": round_id,
        "enabled": True,
        "version_id": version_id,
        "parent_version": parent_version,
        "weights_from": weights.version_id,
        "path": str(path),
        "log_history": json.dumps(result.log_history),
    }
    trained_on = f"{len(pairs)} pairs, each direction flipped with probability 1/2"
    return RoundCheckpoint(pd.DataFrame([record], columns=CONTROL_COLUMNS), result, trained_on)

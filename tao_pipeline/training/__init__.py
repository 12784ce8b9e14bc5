"""Training: preference pairs from scores, then DPO (default) or GRPO with TRL, LoRA by default.

- ``pairs``: scores -> preference pairs (best vs worst candidate, when the margin is clear);
- ``trainer``: what every TRL trainer shares (arguments, merged checkpoints); ``callbacks``: threads, progress bars;
- ``dpo``, ``grpo``: the two methods; ``methods``: the one dispatch table (dpo, grpo, control);
- ``tune``: a round's checkpoint, trained, saved atomically and registered;
- ``distributed``, ``worker``: the same methods under `accelerate launch`.
"""

from tao_pipeline.training.pairs import PAIR_COLUMNS, build_pairs, shuffle_directions
from tao_pipeline.training.trainer import ADAPTER_DIR, TRAINING_LOG_FILE, TrainingResult
from tao_pipeline.training.tune import (
    CONTROL_COLUMNS,
    RoundCheckpoint,
    checkpoint_version_id,
    control_round,
    train_control,
    tune_checkpoint,
    tune_round,
)

__all__ = [
    "ADAPTER_DIR",
    "CONTROL_COLUMNS",
    "PAIR_COLUMNS",
    "TRAINING_LOG_FILE",
    "RoundCheckpoint",
    "TrainingResult",
    "build_pairs",
    "checkpoint_version_id",
    "control_round",
    "shuffle_directions",
    "train_control",
    "tune_checkpoint",
    "tune_round",
]

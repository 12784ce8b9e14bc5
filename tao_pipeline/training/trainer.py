"""What every TRL trainer here shares: arguments, progress bars, and the fit-and-save of a merged checkpoint.

The result is always a merged, standalone model directory (safetensors) so every version
loads the same way, rounds can chain, and transformers or vLLM can serve it directly.
With LoRA the adapter is saved beside it in ``adapter/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_pipeline.registry.loading import bf16_supported, load_model, load_tokenizer
from tao_pipeline.settings import TrainingSettings
from tao_pipeline.training.lm_head import completions_only_on_cpu

if TYPE_CHECKING:
    from transformers import TrainerCallback

ADAPTER_DIR = "adapter"
TRAINING_LOG_FILE = "training_log.json"


@dataclass
class TrainingResult:
    steps: int
    seconds: float  # the training steps
    log_history: list[dict[str, Any]] = field(default_factory=list)
    setup_seconds: float = 0.0  # building the trainer: tokenizing, and DPO's reference pass when precomputed
    threads: dict[str, int | str] = field(default_factory=dict)  # torch_threads and torch_threads_why
    history_turns_cut: int = 0  # earlier conversation turns left out to fit training.max_length

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    def series(self, key: str) -> list[float]:
        return [entry[key] for entry in self.log_history if key in entry]

    def metrics(self) -> dict[str, float | str]:
        summary: dict[str, float | str] = {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "seconds_per_step": round(self.seconds_per_step, 2),
            "setup_seconds": round(self.setup_seconds, 1),
            "history_turns_cut": self.history_turns_cut,
        }
        for key in ("loss", "rewards/margins", "rewards/accuracies", "reward", "kl"):
            values = self.series(key)
            if values:
                summary[f"first_{key}"] = round(values[0], 4)
                summary[f"last_{key}"] = round(values[-1], 4)
        return {**summary, **self.threads}


def trainer_arguments(
    settings: TrainingSettings,
    output_dir: str,
    *,
    defaults: dict[str, Any],
    options: dict[str, Any],
    from_settings: dict[str, Any],
) -> dict[str, Any]:
    """A TRL config's arguments: tao's defaults, then the user's table (``training.dpo_args`` / ``grpo_args``),
    then what tao's settings set, which wins (the table was checked at load: such a key is already gone, warned).

    TRL defaults to bf16 and gradient checkpointing on and a 1e-6 learning rate; tao decides each.
    """
    import torch

    # TRL still passes the deprecated name; the warning is noise for our users.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    shared_defaults = {
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0,
    }
    return {
        **shared_defaults,
        **defaults,
        **options,
        **shared_settings_arguments(settings),
        **from_settings,
        "output_dir": output_dir,
    }


def shared_settings_arguments(settings: TrainingSettings) -> dict[str, Any]:
    """The TrainingArguments tao's own settings set, for every method (settings.trl_options.FROM_SETTINGS)."""
    return {
        "learning_rate": settings.learning_rate,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps or -1,
        "bf16": bf16_supported() if settings.bf16 is None else settings.bf16,
        "seed": settings.seed,
    }


def fit_and_save(
    make_trainer: Callable[[Any, Any, Any, str], Any],
    parent_path: Path | str,
    settings: TrainingSettings,
    output_dir: Path,
    *,
    bar: TrainerCallback | None,
    trust_remote_code: bool,
    bf16_frozen_weights: bool = False,
    score_completions_only: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingResult:
    """Load the parent, train with the trainer ``make_trainer(model, tokenizer, peft_config, scratch)`` builds, save.

    ``bf16_frozen_weights``: with LoRA under bf16 autocast, hold the frozen base weights in bf16 once the trainer is
    built (see :func:`hold_frozen_weights_in_bf16`); the trainer must only run the model under autocast.
    ``score_completions_only``: TRL's fused LM head scores only the labelled positions on a CPU too (see
    :mod:`tao_pipeline.training.lm_head`), while the trainer is built and trains.
    """
    from peft import LoraConfig
    from transformers import ProgressCallback, set_seed

    from tao_pipeline.training.callbacks import ThreadsFollowTheLoad

    threads = ThreadsFollowTheLoad(settings.threads)
    tokenizer = load_tokenizer(parent_path, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_model(parent_path, dtype="float32", trust_remote_code=trust_remote_code)
    peft_config = (
        LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        if settings.use_lora
        else None
    )
    set_seed(settings.seed)  # the trainer draws the adapter's initial weights before it seeds itself
    with tempfile.TemporaryDirectory() as scratch, completions_only_on_cpu(score_completions_only):
        started = time.perf_counter()
        trainer = make_trainer(model, tokenizer, peft_config, scratch)
        frozen_in_bf16 = bf16_frozen_weights and settings.use_lora and runs_under_bf16_autocast(trainer)
        if frozen_in_bf16:
            hold_frozen_weights_in_bf16(trainer.model)
        setup_seconds = time.perf_counter() - started
        trainer.remove_callback(ProgressCallback)
        for callback in [threads, bar, *callbacks] if bar is not None else [threads, *callbacks]:
            trainer.add_callback(callback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    result = TrainingResult(
        trainer.state.global_step, seconds, step_logs(trainer.state.log_history), setup_seconds, threads.used()
    )
    save_checkpoint(
        trainer.model,
        tokenizer,
        output_dir,
        settings.use_lora,
        result.log_history,
        merge_into=parent_path if frozen_in_bf16 else None,
        trust_remote_code=trust_remote_code,
    )
    return result


def runs_under_bf16_autocast(trainer) -> bool:
    """The trainer's accelerator runs the model under bf16 autocast (DeepSpeed and FSDP convert the weights
    themselves, and FSDP wants one dtype per flattened module)."""
    accelerator = trainer.accelerator
    return accelerator.native_amp and accelerator.mixed_precision == "bf16" and not trainer.is_fsdp_enabled


def hold_frozen_weights_in_bf16(model) -> None:
    """Store the frozen base weights of the LoRA layers in bf16.

    Under bf16 autocast every such matmul computes with the weight rounded to bf16 anyway, so the forward is the
    same; only the cast of each weight in every forward is gone. Likewise PEFT's cast of a bf16 input up to the
    adapter's fp32, which autocast casts back down. The adapters, the embeddings, the norms and the LM head keep
    their dtype.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            for parameter in module.get_base_layer().parameters(recurse=False):
                if parameter.dtype == torch.float32 and not parameter.requires_grad:
                    parameter.data = parameter.data.to(torch.bfloat16)


def step_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in history if "loss" in entry]


def is_main_process() -> bool:
    """True outside `accelerate launch`, and on rank 0 inside it."""
    return int(os.environ.get("RANK", "0")) == 0


def save_checkpoint(
    model,
    tokenizer,
    output_dir: Path,
    use_lora: bool,
    log_history: list[dict[str, Any]],
    *,
    merge_into: Path | str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Merged safetensors (+ the LoRA adapter in adapter/) and the per-step training log; rank 0 only.

    ``merge_into``: merge the adapter into this model's fp32 weights, loaded afresh, instead of into the trained
    model's own (held in bf16 while training: a small update would round away in them).
    """
    if not is_main_process():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TRAINING_LOG_FILE).write_text(json.dumps(log_history, indent=1))
    if use_lora:
        model.save_pretrained(output_dir / ADAPTER_DIR, safe_serialization=True)
        if merge_into is not None:
            from peft import PeftModel

            parent = load_model(merge_into, dtype="float32", trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(parent, output_dir / ADAPTER_DIR)
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)

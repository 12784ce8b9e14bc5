"""Online preference tuning with TRL's GRPO: the policy samples, the label-free scorer rewards.

GRPO samples ``num_generations`` completions per prompt and scores them against their siblings,
which is what the round's composite scorer already does, so the reward is that scorer applied
to each prompt's group. The result is saved exactly like DPO's: merged safetensors + ``adapter/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from tao_pipeline.data.conversation import HistoryCuts, row_chat
from tao_pipeline.scoring import TaoScorer
from tao_pipeline.scoring.base import PromptContext, prompt_context
from tao_pipeline.settings import TrainingSettings
from tao_pipeline.training.callbacks import LossProgressBar
from tao_pipeline.training.trainer import TrainingResult, fit_and_save, trainer_arguments

if TYPE_CHECKING:
    from transformers import TrainerCallback

REWARD_NAME = "tao_score"  # TRL logs the per-function reward as rewards/<name>/mean


def scorer_reward_function(scorer: TaoScorer, prompts: pd.DataFrame) -> Callable[..., list[float]]:
    """A TRL reward function: each prompt's completions are scored together, as one round group."""
    contexts = prompt_contexts(prompts)

    def tao_score(prompts, completions, prompt_id, **kwargs) -> list[float | None]:
        rewards: list[float | None] = [None] * len(completions)
        for pid, indices in _indices_by_prompt(prompt_id).items():
            group = [completion_text(completions[i]) for i in indices]
            scores = scorer.score(_context(contexts, pid), group).scores
            for index, score in zip(indices, scores, strict=True):
                rewards[index] = _as_reward(score)
        return rewards

    tao_score.__name__ = REWARD_NAME
    return tao_score


def prompt_contexts(prompts: pd.DataFrame) -> dict[str, PromptContext]:
    contexts = {}
    for row in prompts.drop_duplicates("prompt_id").to_dict("records"):
        contexts[row["prompt_id"]] = prompt_context(row)
    return contexts


def completion_text(completion: str | list[dict]) -> str:
    """Standard completions are strings; conversational ones are a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def _indices_by_prompt(prompt_ids: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(index)
    return groups


def _context(contexts: dict[str, PromptContext], prompt_id: str) -> PromptContext:
    if prompt_id not in contexts:
        raise KeyError(f"reward for unknown prompt_id {prompt_id!r}: it is not in the prompts table")
    return contexts[prompt_id]


def _as_reward(score) -> float | None:
    # A failed or non-finite score is no reward at all (None): TRL leaves such a completion out of its
    # group's baseline and gives it no advantage, instead of learning from a scorer's failure.
    if isinstance(score, (int, float)) and math.isfinite(score):
        return float(score)
    return None


def prompt_dataset(
    prompts: pd.DataFrame, tokenizer=None, max_prompt_tokens: int | None = None, cuts: HistoryCuts | None = None
):
    """Conversational prompts, so TRL applies the model's chat template; prompt_id reaches the reward.

    With a tokenizer, a conversation over ``max_prompt_tokens`` loses its oldest turns first, counted in ``cuts``."""
    cuts = cuts if cuts is not None else HistoryCuts()

    def fit(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if tokenizer is None or max_prompt_tokens is None:
            return messages
        return cuts.fit(tokenizer, messages, max_prompt_tokens)

    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(
        [{"prompt": fit(row_chat(row)), "prompt_id": row.prompt_id} for row in prompts.itertuples()]
    )


def check_grpo_batch(settings: TrainingSettings) -> None:
    options = settings.grpo
    if options.num_generations < 2:
        raise ValueError(
            f"training.grpo.num_generations must be at least 2, got {options.num_generations}: "
            "GRPO compares each completion with its siblings"
        )
    completions_per_step = settings.batch_size * settings.gradient_accumulation_steps
    if completions_per_step % options.num_generations:
        raise ValueError(
            f"training.batch_size ({settings.batch_size}) x training.gradient_accumulation_steps "
            f"({settings.gradient_accumulation_steps}) = {completions_per_step} completions per step must be "
            f"divisible by training.grpo.num_generations ({options.num_generations})"
        )


# The loss and reward scaling are pinned because TRL has changed their defaults before; training.grpo_args may
# change any of these.
GRPO_DEFAULTS = {
    "top_p": 1.0,
    "loss_type": "dapo",
    "scale_rewards": "group",
    "vllm_mode": "colocate",
    "use_transformers_continuous_batching": False,
    "log_completions": False,
}


def grpo_config(settings: TrainingSettings, output_dir: str):
    """TRL's GRPOConfig: tao's defaults, ``training.grpo_args``, then tao's own settings."""
    from trl import GRPOConfig

    return GRPOConfig(
        **trainer_arguments(
            settings,
            output_dir,
            defaults=GRPO_DEFAULTS,
            options=settings.grpo_args,
            from_settings=grpo_settings_arguments(settings),
        )
    )


def grpo_prompt_budget(settings: TrainingSettings) -> int:
    """Prompt tokens a GRPO example may hold: training.max_length less the completion's room (at least half)."""
    return max(settings.max_length - settings.grpo.max_completion_length, settings.max_length // 2)


def grpo_settings_arguments(settings: TrainingSettings) -> dict:
    """The GRPO options tao's own settings set (TRL's defaults: beta 0, temperature 1, 512-token completions),
    and the one it decides (the reward reads each prompt's prompt_id column)."""
    options = settings.grpo
    return {
        "num_generations": options.num_generations,
        "max_completion_length": options.max_completion_length,
        "temperature": options.temperature,
        "beta": options.beta,
        "use_vllm": options.use_vllm,
        "remove_unused_columns": False,
    }


def train_grpo(
    parent_path: Path | str,
    prompts: pd.DataFrame,
    scorer: TaoScorer,
    settings: TrainingSettings,
    output_dir: Path,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingResult:
    """Tune the parent model with GRPO on the prompts and save merged weights (+ adapter) into output_dir."""
    from trl import GRPOTrainer

    if prompts.empty:
        raise ValueError("no prompts to train on: GRPO needs at least one train prompt")
    check_grpo_batch(settings)
    cuts = HistoryCuts()
    result = fit_and_save(
        lambda model, tokenizer, peft_config, scratch: GRPOTrainer(
            model=model,
            reward_funcs=scorer_reward_function(scorer, prompts),
            args=grpo_config(settings, scratch),
            train_dataset=prompt_dataset(prompts, tokenizer, grpo_prompt_budget(settings), cuts),
            processing_class=tokenizer,
            peft_config=peft_config,
        ),
        parent_path,
        settings,
        output_dir,
        bar=RewardProgressBar() if progress else None,
        trust_remote_code=trust_remote_code,
        callbacks=callbacks,
    )
    result.history_turns_cut = cuts.turns
    return result


class RewardProgressBar(LossProgressBar):
    """The DPO progress bar, showing GRPO's mean reward instead of the DPO margin."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="grpo", unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", reward=f"{logs.get('reward') or 0.0:.3f}")

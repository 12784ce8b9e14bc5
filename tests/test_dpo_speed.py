"""The faster DPO path trains the same model as the step-by-step one: the same seed and pairs, the same losses.

Faster: the reference log-probs computed once before training, the frozen base weights held in bf16 under bf16
autocast, and TRL's LM head scoring only the completion tokens on a CPU. Each has a setting that turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tao_pipeline.registry.loading import load_model
from tao_pipeline.settings import TrainingSettings
from tao_pipeline.training.dpo import train_dpo
from tao_pipeline.training.lm_head import completions_only_on_cpu
from tao_pipeline.training.trainer import TrainingResult
from tests.test_training import make_pairs

STEP_BY_STEP = {"precompute_ref_log_probs": False, "bf16_frozen_weights": False, "score_completions_only": False}


def settings(**kwargs) -> TrainingSettings:
    values = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8, "max_length": 64}
    return TrainingSettings(**(values | kwargs))


class Probe(TrainerCallback):
    """What the trainer trains with: the columns of its data and the dtypes of the frozen base weights."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.columns = train_dataloader.dataset.column_names
        self.base_dtypes = {p.dtype for name, p in model.named_parameters() if ".base_layer." in name}


@dataclass
class Run:
    result: TrainingResult
    probe: Probe
    out: Path


def train(tiny_model_dir, out: Path, **values) -> Run:
    probe = Probe()
    result = train_dpo(tiny_model_dir, make_pairs(6), settings(**values), out, progress=False, callbacks=[probe])
    return Run(result, probe, out)


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "bf16"])
def runs(request, tiny_model_dir, tmp_path_factory) -> dict:
    """The same training twice, step by step and the faster way, without and with bf16 autocast."""
    bf16, folder = request.param, tmp_path_factory.mktemp("dpo-speed")
    return {
        "old": train(tiny_model_dir, folder / "old", bf16=bf16, **STEP_BY_STEP),
        "new": train(tiny_model_dir, folder / "new", bf16=bf16),
        "bf16": bf16,
    }


def test_the_faster_path_keeps_the_loss_curve(runs):
    old, new = runs["old"].result, runs["new"].result
    losses = new.series("loss")
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trains
    # fp32: the same sums in another order; bf16: the reference pass pads its batches differently.
    assert losses == pytest.approx(old.series("loss"), abs=5e-3 if runs["bf16"] else 1e-5)
    assert new.setup_seconds > 0


def test_each_speed_up_is_on_by_default_and_can_be_turned_off(runs):
    new, old = runs["new"].probe, runs["old"].probe
    assert "ref_chosen_logps" in new.columns and "ref_chosen_logps" not in old.columns
    assert old.base_dtypes == {torch.float32}
    # Without autocast nothing computes in bf16, so the frozen weights stay fp32.
    assert new.base_dtypes == ({torch.bfloat16} if runs["bf16"] else {torch.float32})


def test_the_adapter_is_merged_into_the_parents_fp32_weights(runs, tiny_model_dir):
    parent = load_file(str(tiny_model_dir / "model.safetensors"))
    child = load_file(str(runs["new"].out / "model.safetensors"))
    assert {tensor.dtype for tensor in child.values()} == {torch.float32}
    changed = [name for name, tensor in child.items() if not torch.equal(tensor, parent[name])]
    assert changed and all(name.endswith("proj.weight") for name in changed)
    for name in changed:
        # Merged into bf16 weights, the small update would have been rounded to bf16 steps.
        assert not torch.equal(child[name], child[name].bfloat16().float())
        assert (child[name] - parent[name]).abs().max() < 0.05


def test_completion_only_scoring_gives_the_same_log_probs(tiny_model_dir):
    from trl.trainer import utils as trl_utils

    model = load_model(tiny_model_dir, dtype="float32")
    trl_utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12))
    labels = input_ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[0, 10:] = -100  # padding

    def log_probs():
        with torch.no_grad():
            return model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs

    every_position = log_probs()
    with completions_only_on_cpu() as active:
        assert active and trl_utils._use_triton(torch.device("cpu"))
        completions_only = log_probs()
    assert not trl_utils._use_triton(torch.device("cpu"))  # only inside the block
    assert (every_position[:, :6] == 0).all() and every_position[1, 6:].ne(0).all()
    torch.testing.assert_close(completions_only, every_position)

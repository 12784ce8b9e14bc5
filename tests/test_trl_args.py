"""training.dpo_args / training.grpo_args: every TRL option reachable, checked at load, tao's own settings winning."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerCallback
from transformers.trainer_utils import SchedulerType

from tao_pipeline.registry.loading import bf16_supported
from tao_pipeline.settings import SettingsError, TrainingSettings, load_settings
from tao_pipeline.settings.trl_options import FROM_SETTINGS, TAO_DECIDES
from tao_pipeline.training.dpo import dpo_config, dpo_settings_arguments, train_dpo
from tao_pipeline.training.grpo import grpo_config, grpo_settings_arguments
from tao_pipeline.training.trainer import shared_settings_arguments
from tests.test_training import make_pairs
from tests.test_training import settings as tiny_training


def load_error(*overrides: str) -> str:
    with pytest.raises(SettingsError) as error:
        load_settings(overrides=list(overrides))
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "training.dpo_args.los_type='ipo'",
            "training.dpo_args.los_type: DPOConfig has no option 'los_type'; did you mean 'loss_type'?",
        ),
        ("training.dpo_args.weight_decy=0.1", "did you mean 'weight_decay'?"),
        ("training.dpo_args.warmup_ratio=0.1", "it is now warmup_steps (a value below 1 is a share"),
        ("training.dpo_args.no_such_thing=1", "DPOConfig has no option 'no_such_thing'"),
        (
            "training.grpo_args.num_generation=8",
            "GRPOConfig has no option 'num_generation'; did you mean 'num_generations'",
        ),
        ("training.grpo_args.epsilonn=0.3", "did you mean 'epsilon'"),
        ("training.dpo_args.output_dir='/tmp/x'", "training.dpo_args.output_dir: tao sets it"),
        ("training.grpo_args.remove_unused_columns=true", "the reward needs each prompt's prompt_id column"),
    ],
)
def test_an_unknown_or_mistyped_key_is_one_line_naming_it(override, expected):
    assert expected in load_error(override)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.dpo_args.weight_decay='lots'", "training.dpo_args.weight_decay: 'lots' is not a float"),
        ("training.dpo_args.gradient_checkpointing=1", "gradient_checkpointing: 1 is not a bool"),
        ("training.dpo_args.lr_scheduler_type='cosin'", "'cosin' is not a choice; did you mean 'cosine'"),
        ("training.dpo_args.optim='adamw'", "'adamw' is not a choice"),
        # TRL itself would only find these at the first training step, after a round's generation and scoring:
        (
            "training.dpo_args.loss_type='sigmod'",
            "training.dpo_args.loss_type: 'sigmod' is not a choice; did you mean 'sigmoid'",
        ),
        ("training.dpo_args.loss_type=['sigmoid', 'sftt']", "'sftt' is not a choice; did you mean 'sft'"),
        (
            "training.grpo_args.loss_type='dapoo'",
            "training.grpo_args.loss_type: 'dapoo' is not a choice; did you mean 'dapo'",
        ),
        ("training.dpo_args.weight_decay=inf", "weight_decay: must be a finite number"),
        ("training.dpo_args.loss_weights=[1.0, nan]", "loss_weights: must be a finite number"),
        ("training.dpo_args.loss_type=3", "loss_type: 3 is not a"),
        ("training.grpo_args.epsilon='wide'", "training.grpo_args.epsilon: 'wide' is not a float"),
    ],
)
def test_a_wrongly_typed_value_fails_at_load(override, expected):
    assert expected in load_error(override)


def test_good_tables_load_as_given():
    settings = load_settings(
        overrides=[
            "training.dpo_args.loss_type='ipo'",  # one loss, as TRL also takes it
            "training.dpo_args.weight_decay=0",  # an int where a float is declared
            "training.dpo_args.lr_scheduler_type='cosine'",
            "training.dpo_args.warmup_steps=0.1",
            "training.grpo_args.loss_type='grpo'",
            "training.grpo_args.epsilon=0.3",
        ]
    )
    assert settings.training.dpo_args == {
        "loss_type": "ipo",
        "weight_decay": 0,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
    }
    assert settings.training.grpo_args == {"loss_type": "grpo", "epsilon": 0.3}


def test_taos_own_settings_win_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="tao_pipeline.settings"):
        settings = load_settings(
            overrides=[
                "training.learning_rate=2e-5",
                "training.dpo_args.learning_rate=1e-3",
                "training.grpo_args.beta=0",
            ]
        )
    assert settings.training.dpo_args == {} and settings.training.grpo_args == {}
    assert settings.training.learning_rate == 2e-5
    assert dpo_config(settings.training, "unused").learning_rate == 2e-5
    warnings = [record.getMessage() for record in caplog.records]
    assert (
        "training.dpo_args.learning_rate is ignored: tao sets it from training.learning_rate; set that instead"
        in warnings
    )
    assert "training.grpo_args.beta is ignored: tao sets it from training.grpo.beta; set that instead" in warnings


def test_the_mapping_names_exactly_what_tao_sets():
    """settings.trl_options (checked at load) and the training code (which builds the configs) name the same keys."""
    training = TrainingSettings()
    shared = set(shared_settings_arguments(training))
    assert shared | set(dpo_settings_arguments(training)) == set(FROM_SETTINGS["dpo"])
    grpo = shared | set(grpo_settings_arguments(training))
    assert grpo == set(FROM_SETTINGS["grpo"]) | (set(TAO_DECIDES["grpo"]) - {"output_dir"})


def test_trls_risky_defaults_are_set_explicitly():
    """TRL 1.16's DPOConfig defaults to bf16, gradient checkpointing and a 1e-6 learning rate: tao decides each."""
    config = dpo_config(TrainingSettings(), "unused")
    assert config.learning_rate == 5e-5 and config.gradient_checkpointing is False
    assert config.bf16 == bf16_supported()
    assert config.lr_scheduler_type == SchedulerType.CONSTANT_WITH_WARMUP and config.warmup_steps == 0
    grpo = grpo_config(TrainingSettings(), "unused")
    assert (grpo.loss_type, grpo.scale_rewards, grpo.top_p, grpo.remove_unused_columns) == ("dapo", "group", 1.0, False)


def test_grpo_args_reach_the_config():
    settings = TrainingSettings(grpo_args={"loss_type": "grpo", "epsilon": 0.3, "scale_rewards": "batch"})
    config = grpo_config(settings, "unused")
    assert (config.loss_type, config.epsilon, config.scale_rewards) == ("grpo", 0.3, "batch")
    assert config.num_generations == settings.grpo.num_generations


class SeenByTheTrainer(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.args = args
        self.weight_decays = {group["weight_decay"] for group in optimizer.param_groups}


def test_dpo_args_reach_the_trainer(tiny_model_dir, tmp_path):
    """Options only a table sets, checked where the trainer uses them: the loss, the optimizer, the schedule."""
    options = {"loss_type": "ipo", "weight_decay": 0.25, "lr_scheduler_type": "cosine", "warmup_steps": 0.5}
    seen = SeenByTheTrainer()
    settings = tiny_training(max_steps=4, batch_size=1, gradient_accumulation_steps=2, dpo_args=options, threads=1)
    result = train_dpo(tiny_model_dir, make_pairs(8), settings, tmp_path / "out", progress=False, callbacks=[seen])
    args = seen.args
    assert args.loss_type == ["ipo"] and args.lr_scheduler_type == SchedulerType.COSINE and args.warmup_steps == 0.5
    assert args.gradient_accumulation_steps == 2 and args.learning_rate == 1e-3
    assert 0.25 in seen.weight_decays  # AdamW's decayed group
    # IPO's loss at the start, when the policy is its reference: (0 - 1 / (2 beta))^2 = 25 with beta 0.1.
    assert result.series("loss")[0] == pytest.approx(25.0, rel=0.05)
    # Cosine with half the steps as warm-up: the rate climbs, then falls.
    rates = result.series("learning_rate")
    assert rates[0] < rates[1] and rates[-1] < max(rates)
    assert result.metrics()["torch_threads"] == 1 and result.metrics()["torch_threads_why"] == "training.threads=1"


def test_the_loss_choices_are_read_from_trls_help():
    """If TRL rewords its help text, the check must not silently stop: this fails instead."""
    from tao_pipeline.settings.trl_options import documented_choices

    assert {"sigmoid", "ipo", "hinge", "sft"} <= set(documented_choices("dpo")["loss_type"])
    assert {"grpo", "dapo", "dr_grpo"} <= set(documented_choices("grpo")["loss_type"])

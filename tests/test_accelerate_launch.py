"""Training launched through `accelerate launch` (the multi-GPU path), exercised with a 1-process CPU config."""

import pytest

from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import ModelSettings, TaoSettings, TrainingSettings
from tao_pipeline.training import tune_checkpoint
from tests.test_training import make_pairs

CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_processes: 1
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""


def test_a_round_can_train_under_accelerate_launch(tiny_model_dir, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(CPU_CONFIG)
    store = ModelStore(tmp_path / "models")
    parent = store.champion(ModelSettings(base=str(tiny_model_dir)), log=lambda _: None)
    training = TrainingSettings(max_steps=2, batch_size=2, bf16=False, lora_r=4, lora_alpha=8, accelerate_config=config)
    version, result = tune_checkpoint(
        store, parent, make_pairs(4), TaoSettings(home=tmp_path, training=training), "round-0001", progress=False
    )
    assert result.steps == 2 and len(result.series("loss")) == 2
    assert (version.path / "model.safetensors").is_file() and (version.path / "adapter").is_dir()
    assert not (version.path / ".job").exists()


def test_a_failing_launch_reports_the_error(tiny_model_dir, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(CPU_CONFIG)
    store = ModelStore(tmp_path / "models")
    parent = store.champion(ModelSettings(base=str(tiny_model_dir)), log=lambda _: None)
    training = TrainingSettings(max_steps=1, batch_size=2, bf16=False, accelerate_config=config)
    with pytest.raises(RuntimeError, match="accelerate launch failed"):
        tune_checkpoint(
            store, parent, make_pairs(0), TaoSettings(home=tmp_path, training=training), "round-0001", progress=False
        )

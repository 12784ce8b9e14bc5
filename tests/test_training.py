"""tao_pipeline.training: DPO on the tiny llama, LoRA and full fine-tuning, registry lineage."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import ModelSettings, TaoSettings, TrainingSettings
from tao_pipeline.training import ADAPTER_DIR, TRAINING_LOG_FILE, checkpoint_version_id, tune_checkpoint
from tao_pipeline.training.dpo import preference_dataset, train_dpo
from tao_pipeline.training.pairs import PAIR_COLUMNS


def make_pairs(count: int = 4) -> pd.DataFrame:
    rows = []
    for i in range(count):
        rows.append(
            {
                "pair_id": content_hash("pair", str(i)),
                "prompt_id": f"p{i}",
                "prompt": f"What is {i} + 1? Reply with just the number.",
                "system": "You are a concise assistant." if i % 2 else None,
                "task": "arithmetic",
                "chosen_response_id": f"c{i}",
                "rejected_response_id": f"r{i}",
                "chosen": str(i + 1),
                "rejected": "I am not sure, maybe 7 or 8 or 9.",
                "chosen_score": 1.0,
                "rejected_score": 0.0,
                "margin": 1.0,
            }
        )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def settings(**kwargs) -> TrainingSettings:
    values = {
        "max_steps": 2,
        "batch_size": 2,
        "bf16": False,
        "learning_rate": 1e-3,
        "lora_r": 4,
        "lora_alpha": 8,
        "max_length": 64,
    }
    values.update(kwargs)
    return TrainingSettings(**values)


def changed_tensors(parent_dir, child_dir) -> list[str]:
    parent = load_file(str(parent_dir / "model.safetensors"))
    child = load_file(str(child_dir / "model.safetensors"))
    assert set(child) <= set(parent) and child
    return [name for name, tensor in child.items() if not (tensor.float() - parent[name].float()).abs().max() < 1e-12]


def test_preference_dataset_is_conversational():
    pairs = make_pairs(2)
    data = preference_dataset(pairs)
    assert len(data) == 2
    assert data[0]["prompt"] == [{"role": "user", "content": "What is 0 + 1? Reply with just the number."}]
    assert data[1]["prompt"][0] == {"role": "system", "content": "You are a concise assistant."}
    assert data[0]["chosen"] == [{"role": "assistant", "content": "1"}]
    assert data[0]["rejected"][0]["content"].startswith("I am not sure")


def test_tune_checkpoint_with_lora(tiny_model_dir, tmp_path):
    store = ModelStore(tmp_path / "models")
    parent = store.champion(ModelSettings(base=str(tiny_model_dir)), log=lambda _: None)
    pairs = make_pairs(4)
    config = settings()
    version, result = tune_checkpoint(store, parent, pairs, TaoSettings(training=config), "round-0001", progress=False)

    assert version.version_id == checkpoint_version_id(
        "round-0001", parent.version_id, pairs["pair_id"].tolist(), config
    )
    assert version.parent_version == parent.version_id
    assert version.round == "round-0001"
    assert version.method == "dpo+lora"
    assert version.promoted is False
    out = store.checkpoint_dir(version.version_id)
    assert version.path == out
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.rglob("*.bin"))
    # Nothing but the checkpoint is left in the store's checkpoints folder (no staging dirs).
    assert [p.name for p in out.parent.iterdir()] == [version.version_id]

    log = json.loads((out / TRAINING_LOG_FILE).read_text())
    assert len(log) == 2 and all("loss" in entry for entry in log)
    assert result.steps == 2
    assert result.series("loss") == [entry["loss"] for entry in log]
    # The merged weights are a standalone model that differs from the parent, without LoRA keys.
    changed = changed_tensors(tiny_model_dir, out)
    assert changed
    assert all(name.endswith("proj.weight") for name in changed)  # LoRA only touches the linear layers
    assert not any("lora" in name for name in load_file(str(out / "model.safetensors")))

    row = store.versions().set_index("version_id").loc[version.version_id]
    assert row["parent_version"] == parent.version_id
    metrics = json.loads(row["metrics"])
    assert metrics["steps"] == 2 and metrics["pairs"] == 4
    assert "first_loss" in metrics and "last_loss" in metrics
    assert json.loads(row["hyperparameters"])["use_lora"] is True


def test_full_fine_tuning(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    result = train_dpo(
        tiny_model_dir, make_pairs(2), settings(use_lora=False, max_steps=1, learning_rate=1e-4), out, progress=False
    )
    assert result.steps == 1
    assert (out / "model.safetensors").is_file()
    assert not (out / ADAPTER_DIR).exists()
    assert (out / "tokenizer.json").is_file()
    changed = changed_tensors(tiny_model_dir, out)
    # Full fine-tuning moves more than the linear layers LoRA targets (embeddings, norms).
    assert any("embed_tokens" in name or "norm" in name for name in changed)


def test_empty_pairs_raise(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(tiny_model_dir, make_pairs(0), settings(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tune_checkpoint_with_no_pairs_leaves_no_checkpoint(tiny_model_dir, tmp_path):
    store = ModelStore(tmp_path / "models")
    parent = store.champion(ModelSettings(base=str(tiny_model_dir)), log=lambda _: None)
    with pytest.raises(ValueError):
        tune_checkpoint(store, parent, make_pairs(0), TaoSettings(training=settings()), "round-0001", progress=False)
    assert list((tmp_path / "models" / "checkpoints").iterdir()) == []
    assert store.versions()["version_id"].tolist() == [parent.version_id]


def test_checkpoint_version_id_is_deterministic():
    ids = ["b", "a", "c"]
    first = checkpoint_version_id("round-0001", "base-x", ids, settings())
    assert first == checkpoint_version_id("round-0001", "base-x", ["c", "a", "b"], settings())  # order-free
    assert first.startswith("round-0001-dpo-")
    assert len(first) == len("round-0001-dpo-") + 8
    assert first != checkpoint_version_id("round-0001", "base-y", ids, settings())
    assert first != checkpoint_version_id("round-0001", "base-x", ["a", "b"], settings())
    assert first != checkpoint_version_id("round-0001", "base-x", ids, settings(beta=0.2))
    assert first != checkpoint_version_id("round-0002", "base-x", ids, settings())
    # Threads change how fast, not what is trained; a TRL option changes what is trained.
    assert first == checkpoint_version_id("round-0001", "base-x", ids, settings(threads=1))
    assert first != checkpoint_version_id("round-0001", "base-x", ids, settings(dpo_args={"weight_decay": 0.1}))
    # Other starting weights (flywheel.start_from = "base") are another checkpoint; the parent's own are not.
    assert first == checkpoint_version_id("round-0001", "base-x", ids, settings(), weights_from="base-x")
    assert first != checkpoint_version_id("round-0001", "base-x", ids, settings(), weights_from="base-y")


@pytest.mark.parametrize(
    "override",
    [
        "training.learning_rate=inf",
        "training.learning_rate=nan",
        "training.learning_rate=2.0",
        "training.epochs=inf",
        "training.epochs=1e9",
        "training.max_steps=1_000_000_000",
        "training.beta=inf",
        "training.batch_size=10_000_000",
        "training.max_length=1e12",
        "training.seed=-1",
        "training.seed=4294967296",  # numpy's seed, which transformers sets, is below 2**32
        "training.lora_dropout=1.0",
        "training.grpo.beta=inf",
        "training.grpo.max_completion_length=0",
        "generation.temperature=inf",
        "generation.seed=-5",
        "generation.batch_size=1e9",
        "generation.max_prompt_tokens=1_000_000_000",
        "generation.shard_prompts=0",
    ],
)
def test_training_and_generation_settings_are_finite_and_sane_at_load(override):
    """Accepted at load, broken later (issue 19): each is one line at load naming the setting."""
    from tao_pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as error:
        load_settings(overrides=[override])
    name = override.partition("=")[0]
    assert f"setting {name!r}" in str(error.value) and "\n" not in str(error.value)

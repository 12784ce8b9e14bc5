"""tao_pipeline.model_store: the registry, champions, base resolution and atomic directories.

convert_embedded_model downloads a model, so nothing here resolves the 'embedded' base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tao_pipeline.common.atomic import atomic_directory
from tao_pipeline.registry import ModelNotFoundError, ModelStore, ModelVersion
from tao_pipeline.settings import ModelSettings


def fake_model_dir(path: Path) -> Path:
    """A folder shaped like a model (config.json); registry tests never load it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def test_register_and_get(tmp_path):
    store = ModelStore(tmp_path / "models")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    version = store.register(
        "v1",
        ckpt,
        parent_version="base-x",
        round_id="round-0001",
        method="dpo+lora",
        hyperparameters={"beta": 0.1},
        metrics={"steps": 2},
    )
    assert version == ModelVersion("v1", ckpt, "base-x", "round-0001", "dpo+lora", False)
    assert store.get("v1") == version
    assert isinstance(store.get("v1").path, Path)
    assert store.registry_path.is_file()
    assert store.checkpoint_dir("v1") == tmp_path / "models" / "checkpoints" / "v1"


def test_hub_id_paths_stay_strings(tmp_path):
    store = ModelStore(tmp_path)
    version = store.register("base-org--model", "org/model", parent_version=None, round_id=None, method="base")
    assert version.path == "org/model"


def test_get_unknown_version(tmp_path):
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        ModelStore(tmp_path).get("nope")


def test_versions_table_and_re_register(tmp_path):
    store = ModelStore(tmp_path)
    assert store.versions().empty
    store.register("v1", tmp_path, parent_version=None, round_id=None, method="base")
    store.register("v2", tmp_path, parent_version="v1", round_id="r1", method="dpo", hyperparameters={"lr": 1e-5})
    store.register("v2", tmp_path, parent_version="v1", round_id="r1", method="dpo", hyperparameters={"lr": 2e-5})
    table = store.versions()
    assert table["version_id"].tolist() == ["v1", "v2"]
    assert table.set_index("version_id").loc["v2", "parent_version"] == "v1"
    assert json.loads(table.set_index("version_id").loc["v2", "hyperparameters"]) == {"lr": 2e-5}


def test_add_metrics_merges(tmp_path):
    store = ModelStore(tmp_path)
    store.register("v1", tmp_path, parent_version=None, round_id=None, method="dpo", metrics={"steps": 2, "loss": 0.7})
    store.add_metrics("v1", {"loss": 0.5, "heldout_win_rate": 0.75})
    metrics = json.loads(store.versions().set_index("version_id").loc["v1", "metrics"])
    assert metrics == {"steps": 2, "loss": 0.5, "heldout_win_rate": 0.75}
    with pytest.raises(ModelNotFoundError, match="'ghost'"):
        store.add_metrics("ghost", {"x": 1})


def test_champion_registers_the_local_base_once(tmp_path):
    base = fake_model_dir(tmp_path / "my-base")
    store = ModelStore(tmp_path / "models")
    settings = ModelSettings(base=str(base))
    champion = store.champion(settings, log=lambda _: None)
    assert champion.version_id == "base-my-base"
    assert champion.path == base.resolve()
    assert champion.method == "base"
    assert champion.parent_version is None
    assert champion.promoted is True
    again = store.champion(settings, log=lambda _: None)
    assert again == champion
    assert len(store.versions()) == 1
    promotions = store.promotions()
    assert promotions["version_id"].tolist() == ["base-my-base"]
    assert promotions["action"].tolist() == ["promote"]


def test_champion_is_the_newest_promoted_version(tmp_path):
    base = fake_model_dir(tmp_path / "base")
    store = ModelStore(tmp_path / "models")
    settings = ModelSettings(base=str(base))
    first = store.champion(settings)
    store.register("r1-dpo", tmp_path, parent_version=first.version_id, round_id="r1", method="dpo")
    assert store.champion(settings).version_id == first.version_id  # registered, not promoted
    store.record_promotion("r1-dpo", "promote", "won 0.8")
    assert store.champion(settings).version_id == "r1-dpo"
    assert store.get("r1-dpo").promoted is True
    store.register("r2-dpo", tmp_path, parent_version="r1-dpo", round_id="r2", method="dpo")
    store.record_promotion("r2-dpo", "reject", "lost")
    assert store.champion(settings).version_id == "r1-dpo"
    assert store.get("r2-dpo").promoted is False
    store.record_promotion("r2-dpo", "promote", "won on retry")
    assert store.champion(settings).version_id == "r2-dpo"
    assert store.promotions()["action"].tolist() == ["promote", "promote", "reject", "promote"]
    assert len(store.versions()) == 3  # the base was registered once


def test_record_promotion_updates_the_flag(tmp_path):
    store = ModelStore(tmp_path)
    store.register("v1", tmp_path, parent_version=None, round_id=None, method="dpo", promoted=True)
    store.record_promotion("v1", "demote", "rolled back")
    assert store.get("v1").promoted is False
    row = store.promotions().iloc[-1]
    assert (row["version_id"], row["action"], row["reason"]) == ("v1", "demote", "rolled back")


# -- resolve_base -----------------------------------------------------------------------


def test_resolve_base_local_dir(tmp_path):
    base = fake_model_dir(tmp_path / "tiny")
    assert ModelStore(tmp_path / "m").resolve_base(ModelSettings(base=str(base))) == ("base-tiny", base.resolve())


def test_resolve_base_missing_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no such model directory") as info:
        ModelStore(tmp_path / "m").resolve_base(ModelSettings(base=str(missing)))
    assert "model.base" in str(info.value)
    with pytest.raises(ModelNotFoundError):
        ModelStore(tmp_path / "m").resolve_base(ModelSettings(base="./definitely/not/here"))


def test_resolve_base_dir_without_config(tmp_path):
    empty = tmp_path / "weights-only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        ModelStore(tmp_path / "m").resolve_base(ModelSettings(base=str(empty)))


def test_resolve_base_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    version_id, where = ModelStore(tmp_path / "m").resolve_base(ModelSettings(base="HuggingFaceTB/SmolLM2-135M"))
    assert (version_id, where) == ("base-HuggingFaceTB--SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M")


def test_champion_with_a_broken_base_registers_nothing(tmp_path):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelNotFoundError):
        store.champion(ModelSettings(base=str(tmp_path / "missing")))
    assert store.versions().empty
    assert store.promotions().empty


# -- atomic_directory -------------------------------------------------------------------


def test_atomic_directory_builds_and_renames(tmp_path):
    target = tmp_path / "checkpoints" / "v1"

    def build(staging: Path) -> None:
        assert staging.parent == target.parent and staging != target
        assert not target.exists()  # nothing is visible while building
        (staging / "model.safetensors").write_text("weights")
        (staging / "adapter").mkdir()

    assert atomic_directory(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == ["adapter", "model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["v1"]


def test_atomic_directory_replaces_an_existing_target(tmp_path):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "old.txt").write_text("old")
    atomic_directory(target, lambda staging: (staging / "new.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


@pytest.mark.parametrize("pointing_at", ["a folder that is gone", "a folder that is kept"])
def test_atomic_directory_replaces_a_link_without_following_it(tmp_path, pointing_at):
    """A models folder linked elsewhere (`tao bootstrap` after the cache it pointed to was cleared)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("not ours to delete")
    if pointing_at == "a folder that is gone":
        elsewhere = tmp_path / "gone"
    target = tmp_path / "models" / "v1"
    target.parent.mkdir()
    target.symlink_to(elsewhere, target_is_directory=True)
    atomic_directory(target, lambda staging: (staging / "new.txt").write_text("new"))
    assert not target.is_symlink() and [p.name for p in target.iterdir()] == ["new.txt"]
    assert pointing_at == "a folder that is gone" or (tmp_path / "elsewhere" / "kept.txt").exists()


def test_atomic_directory_leaves_nothing_when_build_raises(tmp_path):
    parent = tmp_path / "checkpoints"
    target = parent / "v1"

    def build(staging: Path) -> None:
        (staging / "half.safetensors").write_text("partial")
        raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError, match="killed mid-training"):
        atomic_directory(target, build)
    assert not target.exists()
    assert list(parent.iterdir()) == []


def test_atomic_directory_keeps_the_old_target_when_build_raises(tmp_path):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "good.txt").write_text("good")

    def build(staging: Path) -> None:
        raise ValueError("bad pairs")

    with pytest.raises(ValueError):
        atomic_directory(target, build)
    assert (target / "good.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]

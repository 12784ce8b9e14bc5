"""The verdict is computed once, stored with the evaluation, and what the checks, `champion` and the CLI act on."""

import dagster as dg
import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.assets.promotion import champion
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.evaluation import VERDICTS_TABLE, ControlVerdict, RoundVerdict, Verdict
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.policy import apply_verdict
from tao_pipeline.settings import ModelSettings, load_settings


def verdict(promote: bool, challenger: str = "round-0001-dpo-x", accuracy: float | None = 0.5) -> RoundVerdict:
    reason = "win rate 0.700 > 0.5, no guard regressed" if promote else "win rate 0.400 does not exceed 0.5"
    return RoundVerdict(
        "round-0001",
        "base-tiny",
        challenger,
        Verdict(promote, 0.7 if promote else 0.4, None, accuracy, 1.1, reason),
        ControlVerdict(True, "labeled accuracy", 0.1, 0.12, True, "CONTROL GAINS AS MUCH AS TAO: ..."),
        ["round-0001: reward rose 0.400 -> 0.600 while held-out accuracy fell 0.500 -> 0.400"],
        2,
    )


def test_a_stored_verdict_reads_back_as_it_was_written(tmp_path):
    lake = Lake(tmp_path)
    for written in (verdict(True), verdict(False, accuracy=None)):
        lake.write(VERDICTS_TABLE, "round-0001", written.to_frame())
        assert RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0001")) == written
    stored = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0001"))
    assert stored.warnings == ["CONTROL GAINS AS MUCH AS TAO: ...", *stored.collapse_alerts]
    assert stored.registry_metrics() == {
        "heldout_win_rate": 0.4,
        "heldout_accuracy": None,
        "parent_heldout_accuracy": None,
    }


def registered(store: ModelStore, model_dir) -> ModelSettings:
    model = ModelSettings(base=str(model_dir))
    base = store.champion(model, log=lambda _: None)
    store.register("round-0001-dpo-x", model_dir, parent_version=base.version_id, round_id="round-0001", method="dpo")
    return model


def test_apply_verdict_promotes_only_a_winner_and_only_once(tmp_path, tiny_model_dir):
    store = ModelStore(tmp_path)
    model = registered(store, tiny_model_dir)
    base = store.champion(model)
    assert apply_verdict(store, model, "round-0001", "round-0001-dpo-x", False, "lost") == base
    assert apply_verdict(store, model, "round-0001", "round-0001-dpo-x", True, "won").version_id == "round-0001-dpo-x"
    apply_verdict(store, model, "round-0001", "round-0001-dpo-x", True, "won again")  # a re-materialized round
    assert store.promotions()["reason"].tolist() == ["configured base model", "round-0001: won"]


def test_champion_acts_on_the_stored_verdict_not_on_a_recomputation(tmp_path, tiny_model_dir):
    """The evaluation rows say the challenger won every prompt, but the stored verdict (a guard refused
    it) says no: champion keeps the champion."""
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[model]\nbase = "{tiny_model_dir}"\n')
    settings = load_settings(config)
    store = ModelStore(settings.models_dir)
    registered(store, tiny_model_dir)
    lake = Lake(settings.lake_dir)
    lake.write("checkpoint_evaluation", "round-0001", pd.DataFrame({"outcome": ["win"] * 4, "round": "round-0001"}))
    lake.write(VERDICTS_TABLE, "round-0001", verdict(False).to_frame())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("rounds", ["round-0001"])
        result = dg.materialize(
            [champion], partition_key="round-0001", instance=instance, resources=build_resources(str(config))
        )
    assert result.success
    metadata = result.asset_materializations_for_node("champion")[0].metadata
    assert metadata["promoted"].value is False and metadata["reason"].value == "win rate 0.400 does not exceed 0.5"
    assert store.champion(settings.model).version_id != "round-0001-dpo-x"

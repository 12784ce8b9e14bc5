"""flywheel.start_from = "challenger": rounds stack on the newest challenger the gate did not find worse,
every gate compares with the champion that serves, and a rollback returns to a model that served;
"base": the champion answers and training starts again from the base model's weights."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation import VERDICTS_TABLE, RoundVerdict
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.lineage import version_lineage
from tao_pipeline.registry.policy import apply_verdict, round_starting_model, unrefuted_challenger
from tao_pipeline.settings import ModelSettings, load_settings
from tao_pipeline.training import checkpoint_version_id, tune
from tao_pipeline.training.tune import train_into_place
from tests.helpers import write_logs, write_tiny_config


@pytest.fixture
def store(tmp_path, tiny_model_dir) -> tuple[ModelStore, ModelSettings, str]:
    models = ModelStore(tmp_path / "models")
    model = ModelSettings(base=str(tiny_model_dir))
    return models, model, models.champion(model, log=lambda _: None).version_id


def challenger(models: ModelStore, version: str, parent: str, gated_against: str | None, win_rate: float, **metrics):
    """A tuned version as a round registers it, with what its gate recorded (none if it never got there): by
    default a win rate whose interval reaches 0.1 either side."""
    round_id = "round-" + version.split("-")[1]
    models.register(version, models.get(parent).path, parent_version=parent, round_id=round_id, method="dpo+lora")
    if gated_against is not None:
        recorded = {"heldout_win_rate_low": win_rate - 0.1, "heldout_win_rate_high": win_rate + 0.1, **metrics}
        models.add_metrics(version, {"heldout_champion": gated_against, "heldout_win_rate": win_rate, **recorded})


def start(models: ModelStore, model: ModelSettings, tmp_path, start_from: str, round_id: str = "round-0009") -> str:
    said: list[str] = []
    version = round_starting_model(models, Lake(tmp_path / "lake"), round_id, model, start_from, log=said.append)
    assert bool(said) == (start_from == "challenger" and version.version_id != models.champion_id()), said
    return version.version_id


def test_by_default_a_round_starts_from_the_champion_whatever_challengers_wait(store, tmp_path):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.6)
    assert start(models, model, tmp_path, "champion") == base


def test_a_chain_of_unproven_challengers_goes_on_from_the_newest_that_was_not_worse(store, tmp_path):
    models, model, base = store
    assert start(models, model, tmp_path, "challenger") == base  # nothing tuned yet
    challenger(models, "c-0001", base, base, 0.55)
    assert start(models, model, tmp_path, "challenger") == "c-0001"
    challenger(models, "c-0002", "c-0001", base, 0.52, heldout_accuracy=0.40, parent_heldout_accuracy=0.40)
    assert start(models, model, tmp_path, "challenger") == "c-0002"
    # Behind but not shown worse (its interval reaches 0.5): the chain goes on from it.
    challenger(models, "c-0003", "c-0002", base, 0.45)
    assert start(models, model, tmp_path, "challenger") == "c-0003"
    # Shown worse by its win rate (upper end below 0.5), or by labeled accuracy: on from the one before.
    challenger(models, "c-0004", "c-0003", base, 0.30, heldout_win_rate_high=0.45)
    assert start(models, model, tmp_path, "challenger") == "c-0003"
    challenger(models, "c-0005", "c-0003", base, 0.60, heldout_accuracy=0.35, parent_heldout_accuracy=0.40)
    assert start(models, model, tmp_path, "challenger") == "c-0003"
    # Refused by a guard (responses grew past evaluation.max_length_ratio), ahead on the vote or not: not either.
    challenger(models, "c-0007", "c-0003", base, 0.70, heldout_evidence="guard")
    assert start(models, model, tmp_path, "challenger") == "c-0003"
    # A round that failed before its gate recorded nothing: not a starting point either.
    challenger(models, "c-0006", "c-0003", None, 0.0)
    assert start(models, model, tmp_path, "challenger") == "c-0003"


def test_a_challenger_whose_weights_are_gone_is_skipped(store, tmp_path, tiny_model_dir):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.55)
    models.register("c-0002", tmp_path / "deleted", parent_version="c-0001", round_id="round-0002", method="dpo")
    models.add_metrics("c-0002", {"heldout_champion": base, "heldout_win_rate": 0.6})
    assert start(models, model, tmp_path, "challenger") == "c-0001"


def test_a_promotion_ends_the_chain_and_the_next_one_starts_on_the_new_champion(store, tmp_path):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.55)
    challenger(models, "c-0002", "c-0001", base, 0.70)
    apply_verdict(models, model, "round-0002", "c-0002", True, "won")
    # c-0001 was gated against base, which no longer serves; c-0002 serves itself.
    assert unrefuted_challenger(models, "c-0002") is None
    assert start(models, model, tmp_path, "challenger") == "c-0002"
    challenger(models, "c-0003", "c-0002", "c-0002", 0.51)
    assert start(models, model, tmp_path, "challenger") == "c-0003"
    # A challenger rejected by hand (any decision in the promotions log) is no starting point.
    models.record_promotion("c-0003", "reject", "looked wrong to a person")
    assert start(models, model, tmp_path, "challenger") == "c-0002"


def test_a_challenger_on_live_traffic_or_rolled_back_from_it_is_no_starting_point(store, tmp_path):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.65)
    challenger(models, "c-0002", "c-0001", base, 0.55)
    models.start_live("c-0002", "canary", 0.1)  # live evidence decides on it: no round builds on it meanwhile
    assert start(models, model, tmp_path, "challenger") == "c-0001"
    models.end_live("rolled back: worse on live traffic", {"users": 3})
    assert start(models, model, tmp_path, "challenger") == "c-0001"


def test_a_rerun_round_keeps_the_model_that_wrote_its_candidates(store, tmp_path):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.55)
    lake = Lake(tmp_path / "lake")
    lake.write("candidate_responses", "round-0002", pd.DataFrame({"model_version": [base]}))
    assert round_starting_model(models, lake, "round-0002", model, "challenger", log=lambda _: None).version_id == base


def test_the_gate_and_a_rollback_skip_challengers_that_never_served(store):
    models, model, base = store
    challenger(models, "c-0001", base, base, 0.55)
    challenger(models, "c-0002", "c-0001", base, 0.70)
    assert models.champion_before("c-0002") == base  # what its gate compares it with
    apply_verdict(models, model, "round-0002", "c-0002", True, "won")
    assert models.champion_before("c-0002") == base and models.rollback_target() == base
    assert models.rollback("regressed").version_id == base
    # The collapse brake, too, rolls back to the model that served before, never to c-0001.
    apply_verdict(models, model, "round-0003", "c-0002", True, "won again")
    models.record_promotion("c-0002", "promote", "by hand")
    challenger(models, "c-0003", "c-0002", "c-0002", 0.6)
    after = apply_verdict(models, model, "round-0003", "c-0003", True, "won", champion_collapse="c-0002 collapsed")
    assert after.version_id == base


@pytest.fixture
def round_home(tmp_path, tiny_model_dir, monkeypatch):
    """A tiny round's config and settings, with DAGSTER_HOME as run_round sets it (restored afterwards)."""
    config = write_tiny_config(tmp_path, tiny_model_dir)
    settings = load_settings(config)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))
    return config, settings


@pytest.mark.slow(minutes=2)
def test_a_round_after_a_refused_one_tunes_its_challenger_and_is_gated_against_the_champion(round_home, tiny_model_dir):
    config, settings = round_home
    # Refused whatever it answers (no win rate exceeds 1.0), so the champion stays the base model.
    overrides = ["flywheel.start_from='challenger'", "evaluation.min_win_rate=1.0"]
    first = run_round(str(config), overrides, echo=lambda *_: None)
    assert first.completed and not first.promoted, first.failure
    models, lake, base = ModelStore(settings.models_dir), Lake(settings.lake_dir), f"base-{tiny_model_dir.name}"
    refused = lake.read("tuned_checkpoint", "round-0001")["version_id"].iloc[0]
    recorded = json.loads(models.versions().set_index("version_id").loc[refused, "metrics"])
    assert recorded["heldout_champion"] == base and recorded["heldout_win_rate_high"] >= 0.5, recorded

    write_logs(settings.inbox_dir / "more.jsonl", [{"id": f"n-{i}", "prompt": f"What is {i} * 3?"} for i in range(12)])
    said: list[str] = []
    second = run_round(str(config), overrides, echo=said.append)
    assert second.completed and second.round_id == "round-0002", second.failure
    assert f"round-0002: tuning {refused} ({base} serves)" in said, said
    assert set(lake.read("candidate_responses", "round-0002")["model_version"]) == {refused}
    tuned = lake.read("tuned_checkpoint", "round-0002").iloc[0]
    assert models.get(tuned["version_id"]).parent_version == refused
    verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0002"))
    assert verdict.champion_version == base  # compared with the model that serves, not with its parent
    assert models.champion_id() == base


@pytest.mark.slow(minutes=1)
def test_a_second_generation_promotion_without_labels_warns_and_a_first_does_not(tmp_path, tiny_model_dir, monkeypatch):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith("labels =")))
    settings = load_settings(config)
    assert settings.data.labels is None
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))  # run_round sets it; restored afterwards
    overrides = ["evaluation.min_win_rate=0.0"]  # every challenger promoted: what matters is what it tuned
    first = run_round(str(config), overrides, echo=lambda *_: None)
    assert first.completed and first.promoted, first.failure
    assert not [warning for warning in first.warnings if "vote alone" in warning], first.warnings  # tuned the base

    write_logs(settings.inbox_dir / "more.jsonl", [{"id": f"n-{i}", "prompt": f"What is {i} * 3?"} for i in range(12)])
    second = run_round(str(config), overrides, echo=lambda *_: None)
    assert second.completed and second.promoted, second.failure
    tuned_from = ModelStore(settings.models_dir).get(
        Lake(settings.lake_dir).read("tuned_checkpoint", "round-0002")["parent_version"].iloc[0]
    )
    assert tuned_from.parent_version is not None  # the first round's tuned model
    [caution] = [warning for warning in second.warnings if "vote alone" in warning]
    assert caution.startswith("checkpoint_evaluation: promoted") and tuned_from.version_id in caution, caution
    assert "data.labels" in caution
    reports = settings.reports_dir
    assert "**Caution:**" not in (reports / "round-0001" / "report.md").read_text()
    second_report = (reports / "round-0002" / "report.md").read_text()
    assert f"**Caution:** {caution.removeprefix('checkpoint_evaluation: ')}" in second_report


@pytest.mark.slow(minutes=1)
def test_with_start_from_base_the_champion_answers_and_training_starts_again_from_the_base_weights(
    round_home, tiny_model_dir, monkeypatch
):
    config, settings = round_home
    trained_from: list[tuple[str, str]] = []  # (method, weights' folder) of every training run, which runs for real

    def spy(job):
        trained_from.append((job.method, str(job.parent_path)))
        return train_into_place(job)

    monkeypatch.setattr(tune, "train_into_place", spy)
    overrides = ["flywheel.start_from='base'", "evaluation.min_win_rate=0.0", "evaluation.control_arm=true"]
    first = run_round(str(config), overrides, echo=lambda *_: None)
    assert first.completed and first.promoted, first.failure
    models, lake, base = ModelStore(settings.models_dir), Lake(settings.lake_dir), f"base-{tiny_model_dir.name}"
    first_version = models.champion_id()
    assert lake.read("tuned_checkpoint", "round-0001")["weights_from"].iloc[0] == base  # round 1: base and parent

    write_logs(settings.inbox_dir / "more.jsonl", [{"id": f"n-{i}", "prompt": f"What is {i} * 3?"} for i in range(12)])
    said: list[str] = []
    second = run_round(str(config), overrides, echo=said.append)
    assert second.completed and second.round_id == "round-0002", second.failure
    assert f"round-0002: tuning {base}'s weights on {first_version}'s answers (flywheel.start_from = base)" in said
    assert set(lake.read("candidate_responses", "round-0002")["model_version"]) == {first_version}
    tuned = lake.read("tuned_checkpoint", "round-0002").iloc[0]
    control = lake.read("control_checkpoint", "round-0002").iloc[0]
    assert tuned["parent_version"] == control["parent_version"] == first_version  # built on the champion's answers
    assert tuned["weights_from"] == control["weights_from"] == base
    base_path = str(models.get(base).path)
    assert sorted(trained_from[-2:]) == [("control", base_path), ("dpo", base_path)], trained_from
    assert (
        json.loads(models.versions().set_index("version_id").loc[tuned["version_id"], "hyperparameters"])[
            "weights_from"
        ]
        == base
    )
    pair_ids = lake.read("preference_pairs", "round-0002")["pair_id"].tolist()
    training = load_settings(config, overrides=overrides).training
    assert tuned["version_id"] == checkpoint_version_id("round-0002", first_version, pair_ids, training, base)
    assert tuned["version_id"] != checkpoint_version_id("round-0002", first_version, pair_ids, training)
    verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0002"))
    assert verdict.champion_version == first_version  # gated against the champion whose answers it learned
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    for asset in ("tuned_checkpoint", "control_checkpoint"):
        materialized = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization
        assert materialized.metadata["weights_from"].value == base, asset
    chain = version_lineage(models, lake, tuned["version_id"]).chain.set_index("version_id")
    assert chain.loc[tuned["version_id"], "weights_from"] == base and chain.loc[first_version, "weights_from"] == base

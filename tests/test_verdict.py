"""The verdict is computed once, stored with the evaluation, and what the checks, `champion` and the CLI act on."""

from pathlib import Path

import dagster as dg
import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.assets.promotion import champion
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.evaluation import VERDICTS_TABLE, ControlVerdict, RoundVerdict, Verdict, decide
from tao_pipeline.evaluation.history import champion_collapse
from tao_pipeline.evaluation.review import RoundEvaluation, store_evaluation, unguarded_promotion
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.policy import apply_verdict
from tao_pipeline.registry.store import ModelVersion
from tao_pipeline.settings import EvaluationSettings, ModelSettings, load_settings


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
        "heldout_champion": "base-tiny",
        "heldout_evidence": "",
        "heldout_win_rate": 0.4,
        "heldout_win_rate_low": None,
        "heldout_win_rate_high": None,
        "heldout_prompts": 0,
        "heldout_accuracy": None,
        "parent_heldout_accuracy": None,
    }


def held_out_rows(outcomes: list[str], labeled: bool = True) -> pd.DataFrame:
    """Evaluation rows with these outcomes; labeled: the challenger right on every prompt, the champion on half."""
    half = len(outcomes) // 2
    return pd.DataFrame(
        {
            "outcome": outcomes,
            "champion_correct": [True, False] * half if labeled else None,
            "challenger_correct": [True, True] * half if labeled else None,
            "champion_chars": 10,
            "challenger_chars": 12,
        }
    )


def decided(round_id: str, outcomes: list[str], champion: str = "base-tiny") -> RoundVerdict:
    promotion = decide(held_out_rows(outcomes), EvaluationSettings())
    return RoundVerdict(round_id, champion, f"{round_id}-dpo-x", promotion, ControlVerdict(False, ""))


def test_a_verdict_with_its_evidence_reads_back_whole_and_an_older_one_without_it(tmp_path):
    lake = Lake(tmp_path)
    written = decided("round-0001", ["win"] * 30 + ["loss"] * 6 + ["tie"] * 4)
    assert written.promote and written.promotion.mcnemar_p is not None
    lake.write(VERDICTS_TABLE, "round-0001", written.to_frame())
    assert RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0001")) == written
    # A verdict stored by a version before intervals existed: the new fields take their defaults.
    old = written.to_frame().drop(columns=["promotion_win_rate_low", "promotion_evidence", "promotion_mcnemar_p"])
    lake.write(VERDICTS_TABLE, "round-0002", old)
    read = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0002")).promotion
    assert read.win_rate_low is None and read.evidence == "" and read.mcnemar_p is None
    assert read.win_rate == written.promotion.win_rate and read.promote


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


def history_row(round_id, starting, tuned, train_reward, accuracy_before) -> dict:
    return {
        "round": round_id,
        "starting_model": starting,
        "tuned_model": tuned,
        "train_reward": train_reward,
        "reward_before": 0.5,
        "reward_after": 0.5,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_before,
    }


def test_the_collapse_guard_names_a_promoted_champion_whose_reward_rose_as_accuracy_fell():
    collapsing = pd.DataFrame(
        [
            history_row("round-0001", "base", "round-0001-dpo-x", 0.40, 0.50),
            history_row("round-0002", "round-0001-dpo-x", "round-0002-dpo-y", 0.60, 0.40),
        ]
    )
    alert = champion_collapse(collapsing, "round-0002")
    assert alert.startswith("round-0001-dpo-x (promoted by round-0001)") and "0.500 -> 0.400" in alert
    assert champion_collapse(collapsing, "round-0001") is None
    healthy = collapsing.assign(accuracy_before=[0.50, 0.55])
    assert champion_collapse(healthy, "round-0002") is None
    not_promoted = collapsing.assign(starting_model=["base", "base"])  # round-0001 kept its champion
    assert champion_collapse(not_promoted, "round-0002") is None


def test_auto_rollback_restores_the_parent_and_promotes_nothing(tmp_path, tiny_model_dir):
    store = ModelStore(tmp_path)
    model = registered(store, tiny_model_dir)
    base = store.champion(model).version_id
    apply_verdict(store, model, "round-0001", "round-0001-dpo-x", True, "won")
    store.register(
        "round-0002-dpo-y", tiny_model_dir, parent_version="round-0001-dpo-x", round_id="round-0002", method="dpo"
    )
    alert = "round-0001-dpo-x (promoted by round-0001): its own-sample reward rose 0.400 -> 0.600 ..."
    after = apply_verdict(store, model, "round-0002", "round-0002-dpo-y", True, "won", champion_collapse=alert)
    assert after.version_id == base
    log = store.promotions()
    assert log["action"].tolist()[-2:] == ["rollback", "promote"]
    assert log["version_id"].tolist()[-2:] == ["round-0001-dpo-x", base]
    assert log["reason"].iloc[-2] == f"auto-rollback after round-0002: {alert}"
    assert "round-0002-dpo-y" not in log["version_id"].tolist()
    # Re-materializing the round does not roll back twice: the collapsed model is no longer champion.
    again = apply_verdict(store, model, "round-0002", "round-0002-dpo-y", True, "won", champion_collapse=alert)
    assert again.version_id == base and len(store.promotions()) == len(log)


def test_the_brake_applies_when_the_evaluation_is_stored_even_if_the_gate_holds_champion_back(tmp_path, tiny_model_dir):
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[model]\nbase = "{tiny_model_dir}"\n')
    settings = load_settings(config)
    store = ModelStore(settings.models_dir)
    base = store.champion(settings.model, log=lambda _: None).version_id
    store.register("round-0001-dpo-x", tiny_model_dir, parent_version=base, round_id="round-0001", method="dpo")
    apply_verdict(store, settings.model, "round-0001", "round-0001-dpo-x", True, "won")
    store.register(
        "round-0002-dpo-x", tiny_model_dir, parent_version="round-0001-dpo-x", round_id="round-0002", method="dpo"
    )
    alert = "round-0001-dpo-x (promoted by round-0001): its own-sample reward rose 0.400 -> 0.600 ..."
    refused = decided("round-0002", ["loss"] * 4, champion="round-0001-dpo-x")  # the gate refuses this one
    collapsed = RoundVerdict(**{**refused.__dict__, "champion_collapse": alert})
    evaluated = RoundEvaluation(pd.DataFrame({"outcome": ["loss"] * 4}), None, collapsed)
    lake = Lake(settings.lake_dir)

    path, rolled_back = store_evaluation(lake, store, evaluated, settings)
    assert path.is_file() and RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, "round-0002")) == collapsed
    assert rolled_back.version_id == base == store.champion(settings.model).version_id
    assert store.promotions()["reason"].iloc[-2] == f"auto-rollback after round-0002: {alert}"
    assert store_evaluation(lake, store, evaluated, settings)[1] is None  # stored again: no second rollback
    off = settings.model_copy(update={"evaluation": settings.evaluation.model_copy(update={"auto_rollback": False})})
    apply_verdict(store, settings.model, "round-0001", "round-0001-dpo-x", True, "won again")
    assert store_evaluation(lake, store, evaluated, off)[1] is None
    assert store.champion(settings.model).version_id == "round-0001-dpo-x"


def test_a_promotion_on_the_vote_alone_from_a_tuned_model_comes_with_a_caution():
    tuned = ModelVersion("round-0002-dpo-a", Path("/w"), "round-0001-dpo-b", "round-0002", "dpo", False)
    base = ModelVersion("base-tiny", Path("/w"), None, None, "base", True)
    won, lost = ["win"] * 30 + ["tie"] * 30, ["loss"] * 30 + ["tie"] * 30
    unlabeled, labeled = (
        decide(held_out_rows(won, labeled=False), EvaluationSettings()),
        decide(held_out_rows(won), EvaluationSettings()),
    )
    assert unlabeled.promote and labeled.promote and unlabeled.challenger_accuracy is None

    caution = unguarded_promotion(unlabeled, tuned)
    assert "tuned from round-0002-dpo-a" in caution and "data.labels" in caution, caution
    assert unguarded_promotion(unlabeled, base) is None  # a first-generation round: the vote is what was measured
    assert unguarded_promotion(labeled, tuned) is None  # the accuracy guard checked it
    assert (
        unguarded_promotion(decide(held_out_rows(lost, labeled=False), EvaluationSettings()), tuned) is None
    )  # nothing served

    evaluated = RoundEvaluation(pd.DataFrame(), None, verdict(True), cautions=[caution])
    assert evaluated.warnings == [*verdict(True).warnings, caution]  # what the evaluation asset logs

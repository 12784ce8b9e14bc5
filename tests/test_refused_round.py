"""A challenger the promotion gate refuses: the blocking check fails, champion is not materialized, the registry keeps
its champion, and `tao round` says "not promoted". Plus the length guard and the control arm's flipping."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.evaluation import decide
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import EvaluationSettings, load_settings
from tao_pipeline.training.pairs import shuffle_directions
from tests.helpers import write_tiny_config

# No win rate exceeds 1.0: a challenger held to it is refused, whatever the tiny random model answers.
UNBEATABLE = ["evaluation.min_win_rate=1.0"]


def test_a_refused_challenger_is_not_promoted_anywhere(tmp_path, tiny_model_dir, monkeypatch):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    settings = load_settings(config)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))  # restored after the test
    args = ["round", "--config", str(config)] + [item for override in UNBEATABLE for item in ("--set", override)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        "\nnot promoted: win rate" in result.output and "does not exceed evaluation.min_win_rate=1.0" in result.output
    )
    # A refusal is an outcome, not a crash: no Dagster stack trace, and the gate's stage says it did not pass.
    assert "Stack Trace" not in result.output and "Traceback" not in result.output and " ERROR " not in result.output
    [gate] = [line for line in result.output.splitlines() if "challenger_beats_champion" in line and "|" in line]
    assert "did not pass" in gate and "DagsterAssetCheckFailedError" not in gate

    store = ModelStore(settings.models_dir)
    base = f"base-{tiny_model_dir.name}"
    assert store.champion_id() == base
    assert store.promotions()["version_id"].tolist() == [base]  # only the base model's registration
    versions = store.versions().set_index("version_id")
    [challenger] = [v for v in versions.index if v.startswith("round-0001-")]
    assert not versions.loc[challenger, "promoted"]

    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        [check] = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("checkpoint_evaluation"), "challenger_beats_champion"), limit=1
        )
        assert check.status.value == "FAILED"  # the blocking check ran and did not pass
        assert instance.get_latest_materialization_event(dg.AssetKey("checkpoint_evaluation")) is not None
        assert instance.get_latest_materialization_event(dg.AssetKey("champion")) is None  # gated


def test_the_length_guard_refuses_responses_that_grew():
    rows = pd.DataFrame(
        {
            "outcome": ["win"] * 12,  # enough wins to be proven: only the guard can refuse
            "champion_correct": [None] * 12,
            "challenger_correct": [None] * 12,
            "champion_chars": [10] * 12,
            "challenger_chars": [25] * 12,
        }
    )
    refused = decide(rows, EvaluationSettings(max_length_ratio=2.0))
    assert not refused.promote and refused.length_ratio == 2.5
    assert refused.reason == "responses grew 2.50x longer (evaluation.max_length_ratio=2.0)"
    assert decide(rows, EvaluationSettings(max_length_ratio=3.0)).promote


def pairs(count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": [f"pair-{i}" for i in range(count)],
            "chosen": [f"good {i}" for i in range(count)],
            "rejected": [f"bad {i}" for i in range(count)],
            "chosen_response_id": [f"c{i}" for i in range(count)],
            "rejected_response_id": [f"r{i}" for i in range(count)],
            "chosen_score": [0.9] * count,
            "rejected_score": [0.2] * count,
            "margin": [0.7] * count,
        }
    )


def test_the_control_arm_flips_half_the_pairs_at_random_and_deterministically():
    original = pairs(400)
    control = shuffle_directions(original, seed=0)
    flipped = control["chosen"].str.startswith("bad")
    assert 160 < flipped.sum() < 240  # about half: a fair coin per pair
    assert control.equals(shuffle_directions(original, seed=0))  # the same seed flips the same pairs
    assert not shuffle_directions(original, seed=1)["chosen"].equals(control["chosen"])  # another seed, others
    kept, swapped = control[~flipped], control[flipped]
    assert kept.equals(original[~flipped])
    for side, other in (("chosen", "rejected"), ("chosen_response_id", "rejected_response_id")):
        assert swapped[side].tolist() == original.loc[flipped, other].tolist()
    assert (swapped["chosen_score"] == 0.2).all() and swapped["margin"].tolist() == pytest.approx([-0.7] * len(swapped))
    assert set(control["pair_id"]) == set(original["pair_id"])  # same pairs, only their direction changed

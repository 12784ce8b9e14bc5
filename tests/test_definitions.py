"""The code location loads, has every stage, and a broken config fails at load time naming the setting."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "raw_prompts",
    "candidate_responses",
    "response_scores",
    "preference_pairs",
    "tuned_checkpoint",
    "control_checkpoint",
    "checkpoint_evaluation",
    "champion",
}
ALL_ASSETS = STAGES | {"usage_logs", "lake_mirror"}
UNPARTITIONED = {"lake_mirror"}  # the lake's mirror in object storage: after any round


def test_definitions_load_with_every_stage_partitioned_by_round():
    from tao_pipeline.definitions import load_definitions

    defs = load_definitions()

    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == ALL_ASSETS
    for key in graph.get_all_asset_keys():
        partitions = graph.get(key).partitions_def
        if key.to_user_string() in UNPARTITIONED:
            assert partitions is None
            continue
        expected = "log_batches" if key.to_user_string() == "usage_logs" else "rounds"
        assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == expected
    assert defs.resolve_job_def("tao_round") is not None and defs.resolve_job_def("ingest_usage_logs") is not None
    assert {s.name for s in defs.sensors} == {
        "usage_log_sensor",
        "new_prompts_round_sensor",
        "live_decision_sensor",
        "mirror_after_a_round_success",
        "mirror_after_a_round_failure",
    }
    assert defs.resolve_job_def("mirror_lake") is not None
    assert [s.name for s in defs.schedules] == ["periodic_round_schedule"]


def test_lineage_runs_from_prompts_to_champion():
    from tao_pipeline.definitions import load_definitions

    defs = load_definitions()

    graph = defs.resolve_asset_graph()
    upstream = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert upstream["raw_prompts"] == {"usage_logs"}
    assert upstream["candidate_responses"] == {"raw_prompts"}
    assert upstream["tuned_checkpoint"] == {"preference_pairs"}
    assert upstream["control_checkpoint"] == {"preference_pairs"}
    assert upstream["checkpoint_evaluation"] == {"tuned_checkpoint", "control_checkpoint"}
    assert upstream["champion"] == {"checkpoint_evaluation"}


def test_evaluation_has_the_promotion_gate_and_two_warnings():
    from tao_pipeline.definitions import load_definitions

    defs = load_definitions()

    graph = defs.resolve_asset_graph()
    names = {key.name for key in graph.asset_check_keys if key.asset_key == dg.AssetKey("checkpoint_evaluation")}
    assert names == {"challenger_beats_champion", "tao_beats_control", "reward_tracks_accuracy"}
    job_checks = {key.name for key in defs.resolve_job_def("tao_round").asset_layer.asset_graph.asset_check_keys}
    assert names <= job_checks


def _validate(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_workspace_yaml_validates(tmp_path):
    result = _validate({"DAGSTER_HOME": str(tmp_path), "TAO_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_config_fails_at_load_naming_the_setting(tmp_path):
    bad = tmp_path / "tao.toml"
    bad.write_text("[generation]\nnum_samples = 0\n")
    result = _validate({"DAGSTER_HOME": str(tmp_path), "TAO_CONFIG": str(bad)})
    assert result.returncode != 0
    assert "generation.num_samples" in result.stdout + result.stderr

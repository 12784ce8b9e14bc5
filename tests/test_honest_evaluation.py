"""Rounds through Dagster with the control arm, a rerun after new prompts, and labels kept out of training."""

import sys

import dagster as dg
import pytest

from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home, run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.settings import SettingsSource, load_settings
from tests.helpers import evaluation_checks, round_assets, write_logs, write_tiny_config

CONTROL = ["evaluation.control_arm=true", "evaluation.min_win_rate=0.0"]


@pytest.fixture(scope="module")
def control_round(tmp_path_factory, tiny_model_dir):
    config = write_tiny_config(tmp_path_factory.mktemp("control"), tiny_model_dir)
    report = run_round(str(config), CONTROL, echo=lambda *_: None)
    return config, report, load_settings(config, CONTROL)


def test_the_control_arm_trains_on_flipped_pairs_and_is_evaluated(control_round):
    _, report, settings = control_round
    assert report.completed
    lake = Lake(settings.lake_dir)
    control = lake.read("control_checkpoint", report.round_id).iloc[0]
    assert control["enabled"] and control["version_id"].startswith("control-round-0001-dpo-")
    assert (settings.controls_dir / control["version_id"] / "model.safetensors").is_file()
    rows = lake.read("checkpoint_evaluation", report.round_id)
    assert (rows["control_version"] == control["version_id"]).all() and rows["control_response"].notna().all()
    assert set(rows["control_outcome"]) <= {"win", "loss", "tie"}
    assert "control" in report.control.lower() and report.before_after["control"].notna().any()
    from tao_pipeline.registry import ModelStore

    assert control["version_id"] not in set(ModelStore(settings.models_dir).versions()["version_id"])


def test_the_round_writes_a_report_and_records_the_warning_checks(control_round):
    _, report, settings = control_round
    text = (settings.reports_dir / report.round_id / "report.md").read_text()
    assert "Control arm" in text and "Collapse guard" in text and "maj@k" in text
    assert (settings.reports_dir / report.round_id / "accuracy_per_task.png").is_file()
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    for name in ("tao_beats_control", "reward_tracks_accuracy"):
        [check] = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("checkpoint_evaluation"), name), limit=1
        )
        assert check.status.value in ("SUCCEEDED", "FAILED"), name
    event = instance.get_latest_materialization_event(dg.AssetKey("checkpoint_evaluation"))
    metadata = event.asset_materialization.metadata
    assert metadata["accuracy_per_task"].value.startswith("![plot](data:image/png;base64,")
    assert "peak_rss_mb" in metadata and "test_time_compute" in metadata


def test_a_rerun_after_new_prompts_generates_and_scores_only_the_new_ones(control_round):
    config, report, settings = control_round
    lake = Lake(settings.lake_dir)
    before = lake.read("raw_prompts", report.round_id)
    new_logs = [
        {"id": f"extra-{i}", "prompt": f"What is {i} * 7? Reply with just the number.", "task": "arithmetic"}
        for i in range(6)
    ]
    write_logs(settings.inbox_dir / "extra.jsonl", new_logs)
    rerun = run_round(str(config), CONTROL, echo=lambda *_: None, rerun=report.round_id)
    assert rerun.completed and rerun.round_id == report.round_id
    after = lake.read("raw_prompts", report.round_id)
    assert len(after) == len(before) + 6
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    generated = instance.get_latest_materialization_event(dg.AssetKey("candidate_responses"))
    metadata = generated.asset_materialization.metadata
    new_train = len(after[after["split"] == "train"]) - len(before[before["split"] == "train"])
    assert metadata["prompts_from_cache"].value == (before["split"] == "train").sum()
    assert metadata["prompts_generated"].value == new_train
    assert metadata["new_tokens"].value > 0 and metadata["tokens_per_second"].value > 0
    scored = instance.get_latest_materialization_event(dg.AssetKey("response_scores")).asset_materialization.metadata
    assert scored["prompts_from_cache"].value == metadata["prompts_from_cache"].value
    assert scored["prompts_scored"].value == new_train
    # The round keeps its starting model even though its first challenger may have been promoted since.
    candidates = lake.read("candidate_responses", report.round_id)
    assert {v.split("-")[0] for v in candidates["model_version"]} == {"base"}


def test_labels_are_read_by_evaluation_only(tmp_path, tiny_model_dir, monkeypatch):
    """An audit hook records every open() of the labels file: none before evaluation, some during it."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config = write_tiny_config(tmp_path, tiny_model_dir)
    settings = load_settings(config)
    labels = str(settings.data.labels)
    opened: list[str] = []
    watching = {"on": True}

    def audit(event, args):
        if watching["on"] and event == "open" and args and str(args[0]) == labels:
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; `watching` switches this one off at the end
    try:
        prepare_dagster_home(settings)
        resources = build_resources(str(config))
        with dg.DagsterInstance.get() as instance:
            ingest_new_files(instance, settings, SettingsSource(str(config)), echo=lambda _: None)
            instance.add_dynamic_partitions("rounds", ["round-0001"])
            by_name = {a.key.to_user_string(): a for a in round_assets()}
            training_side = [
                by_name[n]
                for n in (
                    "raw_prompts",
                    "candidate_responses",
                    "response_scores",
                    "preference_pairs",
                    "tuned_checkpoint",
                    "control_checkpoint",
                )
            ]
            assert dg.materialize(
                training_side, partition_key="round-0001", instance=instance, resources=resources
            ).success
            assert opened == [], "the labels file was opened before evaluation"
            dg.materialize(
                [by_name["checkpoint_evaluation"], *evaluation_checks()],
                partition_key="round-0001",
                instance=instance,
                resources=resources,
                raise_on_error=False,
                selection=[by_name["checkpoint_evaluation"].key],
            )
            assert opened, "evaluation should have read the labels file"
    finally:
        watching["on"] = False

"""A whole round through Dagster on the tiny model: every stage lands in the lake, registry and instance."""

import json

import dagster as dg
import duckdb
import pytest

from tao_pipeline.cli.runner import NothingNewError, run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings
from tests.helpers import write_logs, write_tiny_config

ROUND_TABLES = [
    "raw_prompts",
    "candidate_responses",
    "response_scores",
    "preference_pairs",
    "tuned_checkpoint",
    "checkpoint_evaluation",
]
TABLES = ["usage_logs", "quarantined_rows", *ROUND_TABLES]


@pytest.fixture(scope="module")
def tiny_round_config(tmp_path_factory, tiny_model_dir):
    return write_tiny_config(tmp_path_factory.mktemp("round"), tiny_model_dir)


@pytest.fixture(scope="module")
def first_round(tiny_round_config):
    with pytest.MonkeyPatch.context() as patch:  # run_round sets DAGSTER_HOME for the process: not beyond here
        patch.delenv("DAGSTER_HOME", raising=False)
        report = run_round(str(tiny_round_config), echo=lambda *_: None)
    return report, load_settings(tiny_round_config)


def test_round_materializes_every_stage(first_round):
    report, settings = first_round
    assert report.completed and report.round_id == "round-0001"
    lake = Lake(settings.lake_dir)
    for table in ROUND_TABLES:
        assert lake.exists(table, "round-0001"), table
    [batch] = report.ingested
    assert len(lake.read("usage_logs", batch)) == 24
    assert len(lake.read("quarantined_rows", batch)) == 2
    prompts = lake.read("raw_prompts", "round-0001")
    assert len(prompts) == 24 and set(prompts["split"]) == {"train", "heldout"}
    candidates = lake.read("candidate_responses", "round-0001")
    assert len(candidates) == 4 * (prompts["split"] == "train").sum()
    assert set(candidates["model_version"]) == {"base-" + settings.model.base.split("/")[-1]}
    evaluation = lake.read("checkpoint_evaluation", "round-0001")
    assert len(evaluation) == (prompts["split"] == "heldout").sum()
    assert set(report.before_after["metric"]) >= {"label-free score (all)", "labeled accuracy (all)"}


def test_round_is_recorded_in_the_dagster_instance(first_round):
    report, settings = first_round
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    assert "round-0001" in instance.get_dynamic_partitions("rounds")
    # Other tests in this module add batches and rounds to the same instance: ask about this round's.
    assert set(report.ingested) <= set(instance.get_dynamic_partitions("log_batches"))
    for asset in ["raw_prompts", "tuned_checkpoint", "checkpoint_evaluation"]:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(dg.AssetKey(asset), asset_partitions=["round-0001"]), limit=1
        ).records
        assert records, f"{asset} was not materialized for round-0001"
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("checkpoint_evaluation"), "challenger_beats_champion"), limit=10
    )
    assert history and all(check.status.value in ("SUCCEEDED", "FAILED") for check in history)


def test_checkpoint_is_registered_with_its_lineage(first_round):
    _, settings = first_round
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    checkpoint = lake.read("tuned_checkpoint", "round-0001").iloc[0]
    version = store.get(checkpoint["version_id"])
    assert version.parent_version.startswith("base-") and version.round == "round-0001"
    assert (version.path / "model.safetensors").is_file() and (version.path / "adapter").is_dir()
    metrics = json.loads(store.versions().set_index("version_id").loc[version.version_id, "metrics"])
    assert metrics["steps"] == 2 and "heldout_win_rate" in metrics
    # pair -> responses -> prompt -> usage-log rows -> source file, in SQL over the catalog
    traced = lake.query(f"""
        WITH logs AS (
            SELECT DISTINCT unnest(p.log_ids) AS log_id
            FROM preference_pairs pp
            JOIN candidate_responses c ON c.response_id = pp.chosen_response_id
            JOIN raw_prompts p ON p.prompt_id = c.prompt_id AND p.round = pp.round
            WHERE pp.pair_id IN (
                SELECT unnest(pair_ids) FROM tuned_checkpoint WHERE version_id = '{version.version_id}'
            )
        )
        SELECT u.external_id, u.source_file FROM logs JOIN usage_logs u USING (log_id)
    """)
    assert len(traced) == len(checkpoint["pair_ids"]) and traced["external_id"].str.startswith("log-").all()
    assert traced["source_file"].str.endswith("logs.jsonl").all()


def test_catalog_is_plain_duckdb(first_round):
    _, settings = first_round
    with duckdb.connect(str(settings.lake_dir / "catalog.duckdb"), read_only=True) as con:
        views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert set(TABLES) <= views


def test_a_round_with_nothing_new_is_refused(first_round, tiny_round_config):
    with pytest.raises(NothingNewError, match="flywheel.replay_fraction"):
        run_round(str(tiny_round_config), echo=lambda *_: None)


def test_second_round_takes_only_new_logs_and_starts_from_the_champion(first_round, tiny_round_config):
    report, settings = first_round
    store = ModelStore(settings.models_dir)
    store.record_promotion(report.checkpoint.split("/")[-1], "promote", "test: chain the rounds")
    champion_after_first = store.champion(settings.model).version_id
    new_logs = [
        {"id": f"new-{i}", "prompt": f"What is {i} * 3? Reply with just the number.", "task": "arithmetic"}
        for i in range(12)
    ]
    write_logs(settings.inbox_dir / "more.jsonl", new_logs)
    second = run_round(str(tiny_round_config), echo=lambda *_: None)
    assert second.completed and second.round_id == "round-0002"
    assert (
        not (settings.inbox_dir / "more.jsonl").exists() and (settings.inbox_dir / "processed" / "more.jsonl").exists()
    )
    lake = Lake(settings.lake_dir)
    prompts = lake.read("raw_prompts", "round-0002")
    assert len(prompts) == 12 and prompts["prompt"].str.contains(r"\* 3").all()
    candidates = lake.read("candidate_responses", "round-0002")
    assert set(candidates["model_version"]) == {champion_after_first}
    checkpoint = lake.read("tuned_checkpoint", "round-0002").iloc[0]
    chain = [v.version_id for v in store.ancestors(checkpoint["version_id"])]
    assert chain[1:] == [champion_after_first, store.get(champion_after_first).parent_version]


def test_registry_commands_lineage_promote_rollback_export(first_round, tiny_round_config, tmp_path):
    from click.testing import CliRunner

    from tao_pipeline.cli import main

    report, settings = first_round
    version = report.checkpoint.split("/")[-1]
    cli = CliRunner()
    args = ["--config", str(tiny_round_config)]

    shown = cli.invoke(main, ["lineage", version, "--rows", *args])
    assert shown.exit_code == 0, shown.output
    assert "round-0001" in shown.output and "logs.jsonl" in shown.output and "log-" in shown.output

    promoted = cli.invoke(main, ["promote", version, "--reason", "looks good", *args])
    assert promoted.exit_code == 0 and ModelStore(settings.models_dir).champion(settings.model).version_id == version
    rolled = cli.invoke(main, ["rollback", "--reason", "regressed in prod", *args])
    assert rolled.exit_code == 0, rolled.output
    store = ModelStore(settings.models_dir)
    assert store.champion(settings.model).version_id == store.get(version).parent_version
    history = store.promotions()
    assert "manual: looks good" in history["reason"].tolist() and "rollback" in history["action"].tolist()

    listed = cli.invoke(main, ["versions", *args])
    assert version in listed.output and "regressed in prod" in listed.output

    exported = cli.invoke(main, ["export", str(tmp_path / "export"), "--version", version, *args])
    assert exported.exit_code == 0, exported.output
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.model_type == "llama"
    assert not (tmp_path / "export" / "adapter").exists()

    missing = cli.invoke(main, ["lineage", "no-such-version", *args])
    assert missing.exit_code != 0 and "no-such-version" in missing.output


def test_a_grpo_round_trains_on_prompts_with_the_scorer_as_reward(tmp_path, tiny_model_dir):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    overrides = [
        "training.method='grpo'",
        "training.grpo.num_generations=2",
        "training.batch_size=2",
        "training.grpo.max_completion_length=8",
    ]
    report = run_round(str(config), overrides, echo=lambda *_: None)
    assert report.completed
    settings = load_settings(config, overrides)
    checkpoint = Lake(settings.lake_dir).read("tuned_checkpoint", "round-0001").iloc[0]
    assert checkpoint["method"] == "grpo+lora" and len(checkpoint["pair_ids"]) == 0
    prompts = Lake(settings.lake_dir).read("raw_prompts", "round-0001")
    assert sorted(checkpoint["prompt_ids"]) == sorted(prompts[prompts["split"] == "train"]["prompt_id"])
    metrics = json.loads(
        ModelStore(settings.models_dir).versions().set_index("version_id").loc[checkpoint["version_id"], "metrics"]
    )
    assert metrics["steps"] == 2 and "last_reward" in metrics


def test_tao_demo_replays_all_prompts_once_they_are_used(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tao_pipeline.cli import main

    config = write_tiny_config(tmp_path, tiny_model_dir)
    first = CliRunner().invoke(main, ["demo", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert "round-0001 finished" in first.output and "replaying" not in first.output
    second = CliRunner().invoke(main, ["demo", "--config", str(config)])
    assert second.exit_code == 0, second.output
    assert "replaying them all from the current champion" in second.output and "round-0002 finished" in second.output
    lake = Lake(load_settings(config).lake_dir)
    assert len(lake.read("raw_prompts", "round-0002")) == len(lake.read("raw_prompts", "round-0001"))


def test_a_failed_round_names_the_failing_stage_and_its_error(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tao_pipeline.cli import main

    config = write_tiny_config(tmp_path, tiny_model_dir)
    # Self-consistency scores can never differ by a whole 1.0 within a group, so no pair is made.
    result = CliRunner().invoke(main, ["round", "--config", str(config), "--set", "pairs.min_margin=1.0"])
    assert result.exit_code == 1
    assert (
        "round-0001 failed before its evaluation: tuned_checkpoint: ValueError: no preference pairs to train "
        "on: lower pairs.min_margin or add prompts"
    ) in result.output
    assert "`tao ui` shows the run" in result.output

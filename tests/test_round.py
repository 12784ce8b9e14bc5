"""A whole round through Dagster on the tiny model: every stage lands in the lake, registry and instance."""

import json

import dagster as dg
import duckdb
import pytest

from tao_pipeline.cli import run_round
from tao_pipeline.lake import Lake
from tao_pipeline.model_store import ModelStore
from tao_pipeline.settings import load_settings
from tests.helpers import write_tiny_config

TABLES = ["raw_prompts", "quarantined_rows", "candidate_responses", "response_scores", "preference_pairs",
          "tuned_checkpoint", "checkpoint_evaluation"]


@pytest.fixture(scope="module")
def tiny_round_config(tmp_path_factory, tiny_model_dir):
    return write_tiny_config(tmp_path_factory.mktemp("round"), tiny_model_dir)


@pytest.fixture(scope="module")
def first_round(tiny_round_config):
    report = run_round(str(tiny_round_config), echo=lambda *_: None)
    return report, load_settings(tiny_round_config)


def test_round_materializes_every_stage(first_round):
    report, settings = first_round
    assert report.success and report.round_id == "round-0001"
    lake = Lake(settings.lake_dir)
    for table in TABLES:
        assert lake.exists(table, "round-0001"), table
    prompts = lake.read("raw_prompts", "round-0001")
    assert len(prompts) == 24 and set(prompts["split"]) == {"train", "heldout"}
    assert len(lake.read("quarantined_rows", "round-0001")) == 2
    candidates = lake.read("candidate_responses", "round-0001")
    assert len(candidates) == 4 * (prompts["split"] == "train").sum()
    assert set(candidates["model_version"]) == {"base-" + settings.model.base.split("/")[-1]}
    evaluation = lake.read("checkpoint_evaluation", "round-0001")
    assert len(evaluation) == (prompts["split"] == "heldout").sum()
    assert set(report.before_after["metric"]) >= {"label-free score (all)", "labeled accuracy (all)"}


def test_round_is_recorded_in_the_dagster_instance(first_round):
    _, settings = first_round
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    assert "round-0001" in instance.get_dynamic_partitions("rounds")
    for asset in ["raw_prompts", "tuned_checkpoint", "checkpoint_evaluation", "champion"]:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization.partition == "round-0001", asset


def test_checkpoint_is_registered_with_its_lineage(first_round):
    _, settings = first_round
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    checkpoint = lake.read("tuned_checkpoint", "round-0001").iloc[0]
    version = store.get(checkpoint["version_id"])
    assert version.parent_version.startswith("base-") and version.round == "round-0001"
    assert (version.path / "model.safetensors").is_file() and (version.path / "adapter").is_dir()
    metrics = json.loads(store.versions().set_index("version_id").loc[version.version_id, "metrics"])
    assert metrics["steps"] == 2 and "heldout_win_rate" in metrics
    # pair -> responses -> prompt -> usage-log ids, in SQL over the catalog
    traced = lake.query(f"""
        SELECT DISTINCT unnest(p.log_ids) AS log_id
        FROM preference_pairs pp
        JOIN candidate_responses c ON c.response_id = pp.chosen_response_id
        JOIN raw_prompts p ON p.prompt_id = c.prompt_id AND p.round = pp.round
        WHERE pp.pair_id IN (SELECT unnest(pair_ids) FROM tuned_checkpoint WHERE version_id = '{version.version_id}')
    """)
    assert len(traced) == len(checkpoint["pair_ids"]) and traced["log_id"].str.startswith("log-").all()


def test_catalog_is_plain_duckdb(first_round):
    _, settings = first_round
    with duckdb.connect(str(settings.lake_dir / "catalog.duckdb"), read_only=True) as con:
        views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert set(TABLES) <= views


def test_second_round_starts_from_the_current_champion(first_round, tiny_round_config):
    report, settings = first_round
    store = ModelStore(settings.models_dir)
    champion_after_first = store.champion(settings.model).version_id
    second = run_round(str(tiny_round_config), echo=lambda *_: None)
    assert second.success and second.round_id == "round-0002"
    candidates = Lake(settings.lake_dir).read("candidate_responses", "round-0002")
    assert set(candidates["model_version"]) == {champion_after_first}

"""Re-materializing a finished round changes nothing: same tables, no new version, no second promotion."""

import pandas as pd

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings
from tests.helpers import write_tiny_config

STABLE_COLUMNS = {
    "raw_prompts": ["prompt_id", "prompt", "split"],
    "candidate_responses": ["response_id", "prompt_id", "response", "model_version"],
    "response_scores": ["response_id", "score", "score_parts"],
    "preference_pairs": ["pair_id", "chosen_response_id", "rejected_response_id"],
    "checkpoint_evaluation": [
        "prompt_id",
        "champion_response",
        "challenger_response",
        "outcome",
        "base_majority_answer",
    ],
}


def test_rematerializing_a_finished_round_is_idempotent(tmp_path, tiny_model_dir):
    config = write_tiny_config(tmp_path, tiny_model_dir)
    overrides = ["evaluation.min_win_rate=0.0"]  # promote, so a rerun could wrongly promote twice
    first = run_round(str(config), overrides, echo=lambda *_: None)
    settings = load_settings(config, overrides)
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    before = {table: lake.read(table, first.round_id)[columns] for table, columns in STABLE_COLUMNS.items()}
    versions, promotions = store.versions()["version_id"].tolist(), store.promotions()
    checkpoint = lake.read("tuned_checkpoint", first.round_id).iloc[0]["version_id"]

    again = run_round(str(config), overrides, echo=lambda *_: None, rerun=first.round_id)
    assert again.completed and again.round_id == first.round_id
    for table, columns in STABLE_COLUMNS.items():
        pd.testing.assert_frame_equal(lake.read(table, first.round_id)[columns], before[table], obj=table)
    assert lake.read("tuned_checkpoint", first.round_id).iloc[0]["version_id"] == checkpoint
    assert store.versions()["version_id"].tolist() == versions
    assert len(store.promotions()) == len(promotions)

"""One rule opens a round, for the round sensor, the schedule and `tao round` alike."""

import dagster as dg
import pandas as pd
import pytest

from tao_pipeline.cli.runner import RoundWaitingError, prepare_dagster_home, run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.rounds import decide_next_round, next_round_key
from tao_pipeline.settings import load_settings


def usage(lake: Lake, batch: str, prompt_ids: list[str]) -> None:
    lake.write("usage_logs", batch, pd.DataFrame({"prompt_id": prompt_ids, "log_id": prompt_ids}))


def test_round_keys_count_up_and_ignore_foreign_partitions():
    assert next_round_key([]) == "round-0001"
    assert next_round_key(["round-0002", "round-0010", "adhoc", "round-x"]) == "round-0011"


def test_a_round_opens_at_the_threshold(tmp_path):
    lake = Lake(tmp_path)
    assert decide_next_round(lake, [], min_unused=1).reason == "0 unused prompts; a round opens at 1"
    usage(lake, "b1", ["p1", "p2", "p3"])
    below = decide_next_round(lake, [], min_unused=4)
    assert below.round_id is None and below.reason == "3 unused prompts; a round opens at 4"
    assert decide_next_round(lake, [], min_unused=3).round_id == "round-0001"


def test_used_prompts_do_not_count_and_replay_may_open_with_none_new(tmp_path):
    lake = Lake(tmp_path)
    usage(lake, "b1", ["p1", "p2"])
    lake.write("raw_prompts", "round-0001", pd.DataFrame({"prompt_id": ["p1", "p2"]}))
    assert decide_next_round(lake, ["round-0001"], min_unused=1).round_id is None
    assert decide_next_round(lake, ["round-0001"], min_unused=0).round_id == "round-0002"


def test_no_round_opens_while_one_has_not_taken_its_prompts(tmp_path):
    lake = Lake(tmp_path)
    usage(lake, "b1", ["p1", "p2"])
    waiting = decide_next_round(lake, ["round-0001"], min_unused=1)
    assert waiting.round_id is None and waiting.waiting_round == "round-0001"
    assert waiting.reason == "round-0001 is open and has not taken its prompts yet"


def test_tao_round_follows_the_rule_and_says_how_to_resume(tiny_config, monkeypatch):
    """A round the sensor opened (or a run that died before taking its prompts) blocks a second one,
    which would take the same prompts; the CLI names the round to rerun instead."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # restored after the test; the runner sets it
    settings = load_settings(tiny_config)
    prepare_dagster_home(settings)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("rounds", ["round-0001"])
    with pytest.raises(RoundWaitingError, match=r"round-0001 is open .* `tao round --rerun round-0001`"):
        run_round(str(tiny_config), echo=lambda *_: None)
    assert Lake(settings.lake_dir).partitions("raw_prompts") == []  # nothing opened, nothing taken

"""The live evidence read from a lake written before tao serve logged live arms: none, not an error."""

from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from tao_pipeline.data.lake import Lake
from tao_pipeline.live.evidence import live_answers
from tao_pipeline.registry import LiveExperiment


def test_a_lake_from_before_live_serving_has_no_live_answers(tmp_path):
    (tmp_path / "usage_logs").mkdir()
    old = pd.DataFrame({"prompt": ["x"], "response_model": ["a"], "received_at": [pd.Timestamp("2026-01-01")]})
    old.to_parquet(tmp_path / "usage_logs" / "logs-1.parquet")
    experiment = LiveExperiment("b", "a", "canary", 0.1, datetime(2025, 1, 1))
    assert live_answers(Lake(tmp_path), experiment).empty
    assert live_answers(Lake(tmp_path / "empty"), experiment).empty


def _served(**changes):
    from tao_pipeline.data.ingest.validation import validated
    from tao_pipeline.settings.sections import DataSettings

    row = {
        "id": "chatcmpl-live",
        "request": {"model": "tao", "messages": [{"role": "user", "content": "What is 2 + 2?"}]},
        "response": {"id": "chatcmpl-live", "object": "chat.completion", "created": 0, "model": "v2", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "4"}}]},
        "model_version": "v2", "latency_ms": 12.5, "live_arm": "canary", "received_at": "2026-12-03T06:35:29.877+00:00",
        **changes,
    }  # fmt: skip
    return validated(row, "serve-x.jsonl", 1, DataSettings()).answer.live


def test_a_live_answer_keeps_the_time_the_server_answered_it():
    """The evidence of one stage must not take answers given before it (ingestion can lag by minutes)."""
    live = _served()
    assert (live.arm, live.latency_ms) == ("canary", 12.5)
    assert live.answered_at == datetime(2026, 12, 3, 6, 35, 29, 877000)  # naive UTC, as the registry's times
    assert _served(received_at="2026-12-03T07:35:29.877+01:00").answered_at == live.answered_at
    for unreadable in ("yesterday", 17, None, "9" * 100):
        assert _served(received_at=unreadable).answered_at is None  # the row stays good; ingestion time stands in


def test_canary_answers_are_paired_with_the_champion_answer_next_to_them_in_time():
    """At a 10% share, pairing the k-th answers of each version would compare a canary answer of the evening
    with a champion answer of the morning; here each pair is of one moment."""
    from tao_pipeline.common.pairing import paired_in_time
    from tao_pipeline.live.evidence import canary_differences

    morning, evening = [("champion", 1.0)] * 9 + [("canary", 1.0)], [("champion", -1.0)] * 9 + [("canary", -1.0)]
    rows = enumerate(morning + evening)
    answers = pd.DataFrame([{"live_arm": arm, "rating": rating, "response_id": f"r{i}"} for i, (arm, rating) in rows])
    assert canary_differences(answers, scorer=None, metric="feedback").tolist() == [0.0, 0.0]
    unrated = answers.assign(rating=[None, *answers["rating"].iloc[1:]])
    assert canary_differences(unrated, scorer=None, metric="feedback").tolist() == [0.0, 0.0]
    order = np.array([True, True, False, False, True])  # the first canary value waits, the second replaces it
    assert paired_in_time(order, np.array([0.1, 0.2, 0.5, 0.7, 0.9])) == pytest.approx([0.2 - 0.5, 0.9 - 0.7])


def test_a_stage_still_undecided_after_live_max_hours_is_rolled_back_even_without_traffic(tmp_path, tiny_model_dir):
    """A quiet app may never send live.min_pairs pairs: the stage must still end, the champion staying."""
    from dataclasses import replace
    from datetime import timedelta

    from tao_pipeline.live.evidence import live_decision
    from tao_pipeline.registry import ModelStore
    from tests.serve_helpers import load, register_checkpoint, serve_config

    settings = load(serve_config(tmp_path, tiny_model_dir))
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model).version_id
    register_checkpoint(settings, tiny_model_dir, "round-0001-dpo-quiet", parent=champion)
    experiment = store.start_live("round-0001-dpo-quiet", "canary", 0.1)
    assert live_decision(settings, store, experiment, act=True).verdict.decision == "continue"
    three_days_ago = replace(experiment, started_at=experiment.started_at - timedelta(hours=73))
    outcome = live_decision(settings, store, three_days_ago, act=True)
    assert outcome.verdict.decision == "roll back" and outcome.verdict.n == 0
    assert "no decision 73.0 h after it started (live.max_hours=72), not proven no worse" in outcome.verdict.reason
    assert outcome.acted == f"round-0001-dpo-quiet rolled back; {champion} answers everyone"
    assert store.live_experiment() is None and store.champion_id() == champion


@pytest.mark.parametrize(
    ("stages", "mode", "following"),
    [
        (["shadow", "canary"], "shadow", "canary"),
        (["shadow", "canary"], "canary", None),
        (["canary"], "canary", None),
        (["canary"], "shadow", "canary"),  # a shadow started by hand: the configured canary still follows
        (["shadow"], "shadow", None),
        (["shadow"], "canary", None),  # a canary by hand is past every shadow
    ],
)
def test_the_stage_after_one_is_the_next_of_live_stages_in_order(stages, mode, following):
    from tao_pipeline.live.evidence import next_stage

    assert next_stage(stages, mode) == following


@pytest.mark.parametrize("stages", [["canary"], ["shadow", "canary"], ["shadow"]])
def test_a_shadow_that_passes_starts_the_canary_live_stages_asks_for_even_when_started_by_hand(
    tmp_path, tiny_model_dir, monkeypatch, stages
):
    """With live.stages = ['canary'], `tao shadow` then a passing shadow once promoted straight to every user:
    a version no user had seen, on the scorers' evidence alone."""
    from tao_pipeline.live import evidence
    from tao_pipeline.registry import ModelStore
    from tests.serve_helpers import load, register_checkpoint, serve_config

    live = f"[live]\nstages = {stages}\nmin_pairs = 10\nmargin = 0.5\n"
    settings = load(serve_config(tmp_path, tiny_model_dir, live))
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model).version_id
    register_checkpoint(settings, tiny_model_dir, "round-0001-dpo-shadowed", parent=champion)
    experiment = store.start_live("round-0001-dpo-shadowed", "shadow", 1.0)  # as `tao shadow` starts it
    monkeypatch.setattr(evidence, "shadow_differences", lambda answers, scorer: np.zeros(400))  # equal answers
    outcome = evidence.live_decision(settings, store, experiment, act=True)
    assert outcome.verdict.decision == "promote"
    if "canary" in stages:
        assert outcome.acted == "round-0001-dpo-shadowed passed its shadow: now canary"
        assert store.live_experiment().mode == "canary" and store.champion_id() == champion
    else:
        assert outcome.acted == "round-0001-dpo-shadowed is the champion"
        assert store.live_experiment() is None and store.champion_id() == "round-0001-dpo-shadowed"

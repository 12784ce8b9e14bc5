"""The live evidence read from a lake written before tao serve logged live arms: none, not an error."""

from datetime import datetime

import pandas as pd

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

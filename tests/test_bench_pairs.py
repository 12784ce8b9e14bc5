"""The pairs the speed benches train on (bench/dpo_step.py: demo_pairs, used by bench/threads.py, bench/throughput.py
and bench/dpo_step.py) stay the pairs a round builds: when conversations added the ``history`` column, they lost
step with PAIR_COLUMNS and every DPO bench failed with a KeyError before its first step."""

import importlib
from pathlib import Path

from tao_pipeline.training.dpo import train_dpo
from tao_pipeline.training.pairs import PAIR_COLUMNS
from tests.test_dpo_speed import settings

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_benches_demo_pairs_have_a_rounds_columns_and_train(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the benches import their siblings (`from common import ...`)
    pairs = importlib.import_module("dpo_step").demo_pairs(8)
    assert list(pairs.columns) == PAIR_COLUMNS and len(pairs) == 8
    assert (pairs["chosen"] != pairs["rejected"]).all() and pairs["history"].isna().all()  # the demo is single-turn
    result = train_dpo(tiny_model_dir, pairs, settings(max_steps=1), tmp_path / "out", progress=False)
    assert result.steps == 1

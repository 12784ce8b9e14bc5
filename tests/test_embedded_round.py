"""The product's promise on the real thing (slow): the embedded SmolLM2-135M, the demo's logs and labels.

One round is tuned on preference pairs turned upside down (a scorer that prefers the worst answer):
the gate must refuse that challenger and keep the base model. The same round is then rerun by the
`tao round --rerun` command on the true pairs, reusing every cached response and score: that
challenger must be promoted and answer more held-out prompts correctly than the base model.
Smaller than `tao demo` (128 prompts, 6 samples, 30 DPO steps) so that it fits CI.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.assets import pairs as pairs_asset
from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.embedded import EMBEDDED_NAME
from tao_pipeline.settings import load_settings

pytestmark = pytest.mark.slow(minutes=5)  # two rounds of the embedded model on about one CPU

# The cheapest round that keeps its margins. Measured 2026-12-04 on one home, the responses cached: on the true pairs
# 30 steps reached 0.382 against the base's 0.309 with a win rate of 0.625 [0.559, 0.691], promoted; with fewer the
# gate's verdict turns on noise (16 steps: not enough evidence; 20: promoted; 24: not enough evidence, 0.581).
PROMISE_ROUND = [
    "data.max_prompts=128",
    "generation.num_samples=6",
    "training.max_steps=30",
    "evaluation.test_time_k=0",
    "evaluation.pool_samples=2",
]
BASE = f"base-{EMBEDDED_NAME}"


def _upside_down(build_pairs):
    """build_pairs as a scorer that ranks every answer backwards would feed it: chosen = worst."""

    def build(prompts, candidates, scores, min_margin):
        return build_pairs(prompts, candidates, scores.assign(score=-scores["score"]), min_margin)

    return build


def _accuracy(before_after: pd.DataFrame) -> tuple[float, float]:
    row = before_after.set_index("metric").loc["labeled accuracy (all)"]
    return float(row["champion"]), float(row["challenger"])


def _printed_accuracy(output: str) -> tuple[float, float]:
    match = re.search(r"\|\s*labeled accuracy \(all\)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", output)
    assert match, output[-3000:]
    return float(match[1]), float(match[2])


def test_the_gate_refuses_a_worse_challenger_and_promotes_a_better_one(tmp_path, monkeypatch, embedded_model_dir):
    home = tmp_path / "home"
    overrides = [f"home='{home}'", *PROMISE_ROUND]
    settings = load_settings(DEMO_CONFIG, overrides=overrides)
    # Where `tao bootstrap` puts the converted model; converted once for every run (tests/conftest.py).
    (settings.models_dir / "base").mkdir(parents=True)
    (settings.models_dir / "base" / EMBEDDED_NAME).symlink_to(embedded_model_dir, target_is_directory=True)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))  # run_round sets it; restored afterwards

    # 1. Pairs upside down: the challenger learns to prefer the worst answers. It must not serve. Two thirds of the
    # steps make it worse with a margin (5 to 7 of 68 prompts at 20 steps, 3 at 14) in less time.
    with monkeypatch.context() as patch:
        patch.setattr(pairs_asset, "build_pairs", _upside_down(pairs_asset.build_pairs))
        worse = run_round(str(DEMO_CONFIG), [*overrides, "training.max_steps=20"], echo=lambda *_: None)
    assert worse.completed and worse.round_id == "round-0001", worse.failure
    base_accuracy, worse_accuracy = _accuracy(worse.before_after)
    assert worse_accuracy < base_accuracy, worse.before_after
    assert not worse.promoted and worse.verdict.startswith("not promoted"), worse.verdict
    store = ModelStore(settings.models_dir)
    assert store.champion(settings.model).version_id == BASE
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    [check] = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("checkpoint_evaluation"), "challenger_beats_champion"), limit=1
    )
    assert check.status.value == "FAILED"
    champion_runs = dg.AssetRecordsFilter(dg.AssetKey("champion"), asset_partitions=["round-0001"])
    assert not instance.fetch_materializations(champion_runs, limit=1).records
    worse_version = Lake(settings.lake_dir).read("tuned_checkpoint", "round-0001")["version_id"].iloc[0]

    # 2. The same round on its true pairs, by the command a user types: promoted, and more accurate.
    command = [sys.executable, "-m", "tao_pipeline.cli", "round", "--config", str(DEMO_CONFIG), "--rerun", "round-0001"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round-0001 finished" in result.stdout and "\npromoted: " in result.stdout, result.stdout[-3000:]
    champion_accuracy, tuned_accuracy = _printed_accuracy(result.stdout)
    assert champion_accuracy == pytest.approx(base_accuracy)
    assert tuned_accuracy > base_accuracy > worse_accuracy

    lake = Lake(settings.lake_dir)
    candidates = lake.read("candidate_responses", "round-0001")
    assert set(candidates["model_version"]) == {BASE} and candidates["completion_tokens"].gt(0).all()
    generated = instance.get_latest_materialization_event(dg.AssetKey("candidate_responses"))
    assert generated.asset_materialization.metadata["prompts_generated"].value == 0  # every response was cached
    version = ModelStore(settings.models_dir).champion(settings.model)
    assert version.version_id != worse_version and version.parent_version == BASE
    assert version.version_id == lake.read("tuned_checkpoint", "round-0001")["version_id"].iloc[0]
    assert Path(version.path, "model.safetensors").stat().st_size > 100_000_000

    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(version.path, use_safetensors=True)
    assert tuned.config.model_type == "llama"

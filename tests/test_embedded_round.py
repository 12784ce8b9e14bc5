"""The real thing: the `tao demo` command (a round on the bundled logs with the demo's settings) on the
embedded SmolLM2-135M model, end to end, made smaller (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tao_pipeline.data.lake import Lake
from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings

pytestmark = pytest.mark.slow

SMALL_ROUND = [
    "data.max_prompts=16",
    "data.max_heldout=8",
    "generation.num_samples=4",
    "training.max_steps=3",
    "evaluation.pool_samples=2",
]


def test_tao_round_with_the_embedded_model(tmp_path):
    home = tmp_path / "home"
    command = [sys.executable, "-m", "tao_pipeline.cli", "demo"]
    for override in SMALL_ROUND:
        command += ["--set", override]
    env = {**os.environ, "TAO_HOME": str(home)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round-0001 finished" in result.stdout
    assert "labeled accuracy (all)" in result.stdout and "challenger win rate (all)" in result.stdout

    settings = load_settings(DEMO_CONFIG, overrides=[f"home='{home}'", *SMALL_ROUND])
    lake = Lake(settings.lake_dir)
    candidates = lake.read("candidate_responses", "round-0001")
    assert len(candidates) == 16 * 4
    assert set(candidates["model_version"]) == {"base-SmolLM2-135M-Instruct"}
    assert candidates["completion_tokens"].gt(0).all()
    version_id = lake.read("tuned_checkpoint", "round-0001")["version_id"].iloc[0]
    version = ModelStore(settings.models_dir).get(version_id)
    assert Path(version.path, "model.safetensors").stat().st_size > 100_000_000

    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(version.path, use_safetensors=True)
    assert tuned.config.model_type == "llama"

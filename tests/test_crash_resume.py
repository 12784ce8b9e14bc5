"""Kill generation with SIGKILL half-way, re-materialize: same table as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home
from tao_pipeline.defs.assets.generation import candidate_responses
from tao_pipeline.defs.assets.prompts import raw_prompts
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.settings import SettingsSource, load_settings
from tests.helpers import write_tiny_config

SLOW_SHARDS = ["generation.shard_prompts=1", "generation.num_samples=16", "generation.max_new_tokens=96"]
GENERATE = """
import sys
import dagster as dg
from tao_pipeline.defs.assets.generation import candidate_responses
from tao_pipeline.defs.resources import build_resources
with dg.DagsterInstance.get() as instance:
    dg.materialize([candidate_responses], partition_key="round-0001", instance=instance,
                   resources=build_resources(sys.argv[1], sys.argv[2:]))
"""


def prepared_round(folder: Path, model_dir: Path):
    """A home whose round-0001 has taken its prompts, ready for candidate generation."""
    folder.mkdir(parents=True)
    config = write_tiny_config(folder, model_dir)
    settings = load_settings(config, SLOW_SHARDS)
    prepare_dagster_home(settings)
    resources = build_resources(str(config), SLOW_SHARDS)
    instance = dg.DagsterInstance.get()
    ingest_new_files(instance, settings, SettingsSource(str(config), tuple(SLOW_SHARDS)), echo=lambda _: None)
    instance.add_dynamic_partitions("rounds", ["round-0001"])
    assert dg.materialize([raw_prompts], partition_key="round-0001", instance=instance, resources=resources).success
    return config, settings, instance, resources


@pytest.mark.slow  # generation SIGKILLed in a subprocess, resumed through Dagster: over 20 s (tests/time_budget.py)
def test_killed_generation_resumes_to_the_same_result(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config, settings, instance, resources = prepared_round(tmp_path / "killed", tiny_model_dir)
    cache = settings.cache_dir / "generations"
    worker = subprocess.Popen(
        [sys.executable, "-c", GENERATE, str(config), *SLOW_SHARDS],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(cache.glob("*/*/*.parquet"))) < 2 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    finished_shards = len(list(cache.glob("*/*/*.parquet")))
    assert finished_shards >= 2, "generation never got going"
    assert not (settings.lake_dir / "candidate_responses" / "round-0001.parquet").exists(), "killed too late"

    result = dg.materialize([candidate_responses], partition_key="round-0001", instance=instance, resources=resources)
    assert result.success
    metadata = result.asset_materializations_for_node("candidate_responses")[0].metadata
    assert metadata["prompts_from_cache"].value >= finished_shards  # one prompt per shard here
    resumed = pd.read_parquet(settings.lake_dir / "candidate_responses" / "round-0001.parquet")

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    _, clean_settings, clean_instance, clean_resources = prepared_round(tmp_path / "clean", tiny_model_dir)
    assert dg.materialize(
        [candidate_responses], partition_key="round-0001", instance=clean_instance, resources=clean_resources
    ).success
    uninterrupted = pd.read_parquet(clean_settings.lake_dir / "candidate_responses" / "round-0001.parquet")

    train = pd.read_parquet(settings.lake_dir / "raw_prompts" / "round-0001.parquet").query("split == 'train'")
    assert len(resumed) == 16 * len(train) and resumed["response_id"].is_unique
    columns = ["response_id", "prompt_id", "sample_index", "response", "completion_tokens", "finish_reason"]
    pd.testing.assert_frame_equal(resumed[columns], uninterrupted[columns])

"""Shared by the benchmarks: a fresh TAO home, a way to reuse an already converted base model, and printing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.registry.embedded import EMBEDDED_NAME

DEMO = str(DEMO_CONFIG)  # the benchmarks run on the demo, with the demo's settings
# A round smaller than `tao demo` (the promise-size round of tests/test_embedded_round.py), and a tiny one
# that only checks the plumbing on a tiny random model.
PROMISE_ROUND = [
    "generation.num_samples=6",
    "training.max_steps=30",
    "evaluation.test_time_k=0",
    "evaluation.pool_samples=2",
]
# The tuning recipes a bench can run a round with: the promise test's short one, or the one `make bench-recipe`
# chose and the demo round uses (8 samples, 2 epochs over the round's pairs); both skip the base model's maj@k.
RECIPES = {"short": PROMISE_ROUND, "demo": ["evaluation.test_time_k=0"]}
TINY_ROUND = [
    "generation.num_samples=2",
    "training.max_steps=2",
    "generation.max_new_tokens=8",
    "evaluation.max_new_tokens=8",
]


def fresh_home(name: str, base_model_from: str | None) -> Path:
    """An empty TAO home, made this process's TAO_HOME; with ``base_model_from`` (a home or a
    models/base/<name> folder) the converted embedded model is copied in, skipping the ~25 s
    download and conversion."""
    home = Path(tempfile.mkdtemp(prefix=f"tao-bench-{name}-"))
    if base_model_from:
        source = Path(base_model_from).expanduser()
        for candidate in (source, source / "models" / "base" / EMBEDDED_NAME):
            if (candidate / "model.safetensors").is_file():
                shutil.copytree(candidate, home / "models" / "base" / EMBEDDED_NAME)
                break
        else:
            raise SystemExit(f"--base-model-from {base_model_from}: no converted {EMBEDDED_NAME} there")
    os.environ["TAO_HOME"] = str(home)
    return home


def show(title: str, table: pd.DataFrame) -> None:
    print(f"\n{title}\n")
    shown = table.dropna(axis=1, how="all")
    print(shown.astype(object).where(shown.notna(), "-").to_markdown(index=False, floatfmt=".3f"))


def run_metadata(dagster_home: Path, run_id: str, asset: str) -> dict:
    """The metadata an asset recorded in one run, as plain values."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.dagster_event.event_specific_data.materialization
        if materialization.asset_key == dg.AssetKey(asset):
            return {key: value.value for key, value in materialization.metadata.items()}
    return {}


def bench_parser(doc: str):
    """An argument parser with the option every benchmark shares."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--base-model-from", help="a TAO home (or model folder) whose converted base model to copy")
    return parser

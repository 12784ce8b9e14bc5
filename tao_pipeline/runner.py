"""Running the flywheel headlessly through Dagster: ingest new log files, then one round.

The CLI and the tests drive Dagster here exactly as the daemon would: the same assets,
partitions, run config and instance (``<home>/dagster``), so every run shows up in the UI.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dagster as dg
import pandas as pd

from tao_pipeline.assets import INGEST_ASSETS, ROUND_ASSETS
from tao_pipeline.assets.partitions import LOG_BATCHES, ROUNDS, next_round_key
from tao_pipeline.checks import challenger_beats_champion
from tao_pipeline.evaluation import decide, summarize
from tao_pipeline.ingest import pending_log_files
from tao_pipeline.lake import Lake
from tao_pipeline.model_store import ModelStore
from tao_pipeline.resources import build_resources
from tao_pipeline.rounds import count_unused_prompts
from tao_pipeline.settings import TaoSettings, load_settings

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# No pool limit here: a run killed in-process (SIGKILL, power loss) would keep its "gpu" slot
# claimed and block every later run. Rounds are serialized by the round sensor instead; a
# deployment sets the limit with `dagster instance concurrency set gpu 1` (docs/deployment.md).
DAGSTER_YAML = """\
telemetry:
  enabled: false
"""


class NothingNewError(RuntimeError):
    """No prompt is left that a round has not used."""


@dataclass
class RoundReport:
    round_id: str
    completed: bool
    seconds: float
    promoted: bool = False
    before_after: pd.DataFrame | None = None
    verdict: str = ""
    champion: str = ""
    checkpoint: str = ""
    ingested: list[str] = field(default_factory=list)


def prepare_dagster_home(settings: TaoSettings) -> Path:
    """Runs launched from here land in <home>/dagster, the same instance `tao ui` opens."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def ingest_new_files(instance: dg.DagsterInstance, settings: TaoSettings, resources: dict,
                     echo: Callable[[str], None]) -> list[str]:
    """Materialize a usage_logs partition for every new inbox, table-source or data.logs file."""
    new = pending_log_files(settings, set(instance.get_dynamic_partitions(LOG_BATCHES)))
    for key, path in new.items():
        instance.add_dynamic_partitions(LOG_BATCHES, [key])
        echo(f"ingesting {path} as {key}")
        dg.materialize(INGEST_ASSETS, partition_key=key, instance=instance, resources=resources,
                       run_config={**QUIET_RUN_CONFIG, "ops": {"usage_logs": {"config": {"path": str(path)}}}})
    return list(new)


def run_round(config_file: str | None = None, overrides: list[str] | None = None,
              echo: Callable[[str], None] = print) -> RoundReport:
    """Ingest what is new, open the next round (a dynamic partition) and materialize all its stages."""
    settings = load_settings(config_file, overrides)
    prepare_dagster_home(settings)
    resources = build_resources(config_file, overrides)
    champion = ModelStore(settings.models_dir).champion(settings.model, log=echo)  # fetch the base model up front
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        ingested = ingest_new_files(instance, settings, resources, echo)
        if count_unused_prompts(Lake(settings.lake_dir)) == 0 and settings.flywheel.replay_fraction == 0:
            raise NothingNewError(
                f"every ingested prompt was used by an earlier round: drop new logs into {settings.inbox_dir} "
                "or set flywheel.replay_fraction"
            )
        round_id = next_round_key(instance.get_dynamic_partitions(ROUNDS))
        instance.add_dynamic_partitions(ROUNDS, [round_id])
        echo(f"{round_id}: tuning {champion.version_id}")
        dg.materialize([*ROUND_ASSETS, challenger_beats_champion], partition_key=round_id, instance=instance,
                       raise_on_error=False, resources=resources, run_config=QUIET_RUN_CONFIG)
    report = RoundReport(round_id, Lake(settings.lake_dir).exists("checkpoint_evaluation", round_id),
                         time.perf_counter() - started, ingested=ingested)
    if report.completed:
        _fill_report(report, settings)
    return report


def _fill_report(report: RoundReport, settings: TaoSettings) -> None:
    lake = Lake(settings.lake_dir)
    rows = lake.read("checkpoint_evaluation", report.round_id)
    report.before_after = summarize(rows)
    verdict = decide(rows, settings.evaluation)
    report.champion = ModelStore(settings.models_dir).champion(settings.model).version_id
    report.checkpoint = str(lake.read("tuned_checkpoint", report.round_id)["path"].iloc[0])
    report.promoted = report.champion == Path(report.checkpoint).name
    report.verdict = ("promoted: " if report.promoted else "not promoted: ") + verdict.reason

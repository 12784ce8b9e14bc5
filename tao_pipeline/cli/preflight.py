"""`tao preflight`: sample the prompts the next round would take, as it would, and say per task whether
label-free tuning has signal there, before a round is spent on it."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
import pandas as pd

from tao_pipeline.cli.instance import prepare_dagster_home
from tao_pipeline.cli.runner import ingest_new_files
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.rounds import PROMPTS_TABLE, USAGE_TABLE, next_round_key, select_round_prompts
from tao_pipeline.defs.constants import ROUNDS
from tao_pipeline.evaluation import load_labels
from tao_pipeline.evaluation.preflight import NoPromptsError, PreflightReport, run_preflight
from tao_pipeline.registry import ModelStore
from tao_pipeline.scoring import check_scorers
from tao_pipeline.settings import SettingsSource, TaoSettings


def preflight(source: SettingsSource, echo: Callable[[str], None]) -> PreflightReport:
    """Ingest what is new (as `tao round` does first), then sample and judge the next round's train prompts
    with the current champion. Raises NoPromptsError when there is nothing to sample."""
    settings = source.load()
    check_scorers(settings.scoring, settings.cache_dir)  # a bad scorer option fails now, not after sampling
    prepare_dagster_home(settings)
    champion = ModelStore(settings.models_dir).champion(settings.model, log=echo)
    with dg.DagsterInstance.get() as instance:
        ingest_new_files(instance, settings, source, echo)
        rounds = instance.get_dynamic_partitions(ROUNDS)
    prompts = next_round_prompts(Lake(settings.lake_dir), rounds, settings, echo)
    labels = load_labels(settings.data.labels)
    echo(f"sampling up to {settings.preflight.prompts_per_task} train prompts per task from {champion.version_id}")
    return run_preflight(prompts, champion.path, champion.version_id, settings, labels)


def next_round_prompts(
    lake: Lake, rounds: list[str], settings: TaoSettings, echo: Callable[[str], None]
) -> pd.DataFrame:
    """The prompts the next round would take; all of them once every one was used (as a replaying round)."""
    if not lake.partitions(USAGE_TABLE):
        raise NoPromptsError(
            f"no usage logs yet: list log files in data.logs or drop them into {settings.inbox_dir}, then run again"
        )
    round_id = next_round_key(rounds)
    prompts = select_round_prompts(lake, round_id, settings.data, settings.flywheel.replay_fraction)
    if prompts.empty and lake.partitions(PROMPTS_TABLE):
        echo("every ingested prompt was used by an earlier round: sampling them all, as a replaying round would")
        prompts = select_round_prompts(lake, round_id, settings.data, 1.0)
    return prompts


def print_report(report: PreflightReport, echo: Callable[[str], None]) -> None:
    echo("\n" + report.table().to_markdown(index=False, floatfmt=".3f"))
    samples = report.samples_per_prompt
    echo(
        f"\nagreement: the share of each task's prompts by how many of its {samples} samples give the majority answer\n"
    )
    echo(report.agreement_histogram().to_markdown(index=False, floatfmt=".2f"))
    echo("")
    for line in report.verdicts():
        echo(line)
    labeled = int(report.tasks["labeled"].sum())
    if not labeled:
        echo("\nno labels for these prompts (data.labels): the verdicts rest on the label-free signals only")
    echo(f"\n{report.generation_note()}")

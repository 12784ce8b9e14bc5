"""The `tao` command: run a round through Dagster, inspect versions, open the UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pandas as pd

from tao_pipeline.lake import Lake
from tao_pipeline.model_store import ModelNotFoundError, ModelStore
from tao_pipeline.settings import SettingsError, TaoSettings, load_settings

QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
_DAGSTER_YAML = "telemetry:\n  enabled: false\n"


@dataclass
class RoundReport:
    round_id: str
    success: bool
    seconds: float
    before_after: pd.DataFrame | None = None
    verdict: str = ""
    champion: str = ""
    checkpoint: str = ""


def prepare_dagster_home(settings: TaoSettings) -> Path:
    """Runs launched by the CLI land in <home>/dagster, the same instance `tao ui` opens."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(_DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def run_round(config_file: str | None = None, overrides: list[str] | None = None, echo=click.echo) -> RoundReport:
    """Open the next round (a dynamic partition) and materialize every stage of it through Dagster."""
    import dagster as dg

    from tao_pipeline.assets import ROUND_ASSETS
    from tao_pipeline.assets.partitions import ROUNDS, next_round_key
    from tao_pipeline.resources import build_resources

    settings = load_settings(config_file, overrides)
    prepare_dagster_home(settings)
    champion = ModelStore(settings.models_dir).champion(settings.model, log=echo)  # fetch the base model up front
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        round_id = next_round_key(instance.get_dynamic_partitions(ROUNDS))
        instance.add_dynamic_partitions(ROUNDS, [round_id])
        echo(f"{round_id}: tuning {champion.version_id} on {', '.join(map(str, settings.data.logs))}")
        result = dg.materialize(
            ROUND_ASSETS, partition_key=round_id, instance=instance, raise_on_error=False,
            resources=build_resources(config_file, overrides), run_config=QUIET_RUN_CONFIG,
        )
    report = RoundReport(round_id, result.success, time.perf_counter() - started)
    if result.success:
        _fill_report(report, settings)
    return report


def _fill_report(report: RoundReport, settings: TaoSettings) -> None:
    from tao_pipeline.evaluation import decide, summarize

    lake = Lake(settings.lake_dir)
    rows = lake.read("checkpoint_evaluation", report.round_id)
    report.before_after = summarize(rows)
    verdict = decide(rows, settings.evaluation.min_win_rate, settings.evaluation.max_accuracy_drop)
    report.verdict = ("promoted: " if verdict.promote else "not promoted: ") + verdict.reason
    store = ModelStore(settings.models_dir)
    report.champion = store.champion(settings.model).version_id
    report.checkpoint = str(lake.read("tuned_checkpoint", report.round_id)["path"].iloc[0])


def _settings_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override one setting, e.g. --set generation.num_samples=4")(command)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="TOML settings file (default: ./tao.toml or $TAO_CONFIG).")(command)


@click.group()
def main() -> None:
    """tao-pipeline: improve your LLM from the prompts its users already send."""


@main.command("round")
@_settings_options
def round_command(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Run one full TAO round headlessly through Dagster and print what improved."""
    try:
        report = run_round(config_file, list(overrides))
    except (SettingsError, ModelNotFoundError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    settings = load_settings(config_file, list(overrides))
    if not report.success:
        raise click.ClickException(
            f"{report.round_id} failed; open the run in the UI (tao ui) for the failing step's error"
        )
    click.echo(f"\n{report.round_id} finished in {report.seconds / 60:.1f} min\n")
    click.echo(report.before_after.to_markdown(index=False))
    click.echo(f"\n{report.verdict}\nchampion:    {report.champion}\ncheckpoint:  {report.checkpoint}")
    click.echo(f"lake:        {settings.lake_dir} (SQL: duckdb {settings.lake_dir / 'catalog.duckdb'})")
    click.echo(f"registry:    {settings.models_dir / 'registry.duckdb'}\nUI:          tao ui")


@main.command()
@_settings_options
def bootstrap(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Fetch and convert the configured base model (the embedded one by default)."""
    settings = _load(config_file, overrides)
    version = ModelStore(settings.models_dir).champion(settings.model)
    click.echo(f"champion: {version.version_id} at {version.path}")


@main.command()
@_settings_options
def versions(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """List every model version in the registry."""
    settings = _load(config_file, overrides)
    table = ModelStore(settings.models_dir).versions()
    click.echo(table.drop(columns=["hyperparameters"]).to_markdown(index=False) if len(table) else "no versions yet")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="TOML settings file (default: ./tao.toml or $TAO_CONFIG).")
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; localhost by default.")
def ui(config_file: str | None, port: int, host: str) -> None:
    """Start `dagster dev` (webserver + daemon) on this home's instance, where `tao round` runs are recorded."""
    settings = _load(config_file, ())
    prepare_dagster_home(settings)
    if config_file:
        os.environ["TAO_CONFIG"] = str(Path(config_file).resolve())
    command = [sys.executable, "-m", "dagster", "dev", "-m", "tao_pipeline.definitions", "-h", host, "-p", str(port)]
    click.echo(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={settings.dagster_home})")
    sys.exit(subprocess.call(command))


def _load(config_file: str | None, overrides: tuple[str, ...]) -> TaoSettings:
    try:
        return load_settings(config_file, list(overrides))
    except SettingsError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()

"""The `tao` command: run a round through Dagster, inspect and manage model versions, open the UI."""

from __future__ import annotations

import os
import sys

import click
import pandas as pd

from tao_pipeline.cli.child import run_tied_to_this_process
from tao_pipeline.cli.errors import TaoGroup
from tao_pipeline.data.lake import DuckDBLockTimeout, Lake, LakeFileError
from tao_pipeline.demo import DEMO_CONFIG
from tao_pipeline.registry import ModelNotFoundError, ModelStore
from tao_pipeline.registry.export import ExportRefused
from tao_pipeline.scoring import check_scorers
from tao_pipeline.scoring.catalog import ScorerOptionsError
from tao_pipeline.settings import SettingsError, SettingsSource, TaoSettings, load_settings

_USER_ERRORS = (
    SettingsError,
    ScorerOptionsError,
    ModelNotFoundError,
    FileNotFoundError,
    DuckDBLockTimeout,
    LakeFileError,
)
# How long a command a person waits on waits for a registry another process holds (a round writes
# for milliseconds; only a stuck process or a read-write `duckdb` shell holds it longer).
COMMAND_LOCK_TIMEOUT_S = 10.0


def _settings_options(command):
    command = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one setting, e.g. --set generation.num_samples=4",
    )(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="TOML settings file (default: ./tao.toml or $TAO_CONFIG).",
    )(command)


def _load(config_file: str | None, overrides: tuple[str, ...]) -> TaoSettings:
    try:
        return load_settings(config_file, list(overrides))
    except SettingsError as error:
        raise click.ClickException(str(error)) from None


def _store(config_file: str | None, overrides: tuple[str, ...]) -> ModelStore:
    return _command_store(_load(config_file, overrides))


def _command_store(settings: TaoSettings) -> ModelStore:
    """The registry as a command opens it: a lock held elsewhere fails the command after a while, not forever."""
    return ModelStore(settings.models_dir, lock_timeout_s=COMMAND_LOCK_TIMEOUT_S)


@click.group(cls=TaoGroup)
def main() -> None:
    """tao-pipeline: improve your LLM from the prompts its users already send."""


@main.command("round")
@_settings_options
@click.option("--rerun", metavar="ROUND", help="Re-materialize an existing round (new prompts join it; caches reused).")
def round_command(config_file: str | None, overrides: tuple[str, ...], rerun: str | None) -> None:
    """Ingest new usage logs and run one full TAO round through Dagster; print what improved."""
    from tao_pipeline.cli.runner import NothingNewError

    try:
        _run_and_report(config_file, list(overrides), rerun=rerun)
    except NothingNewError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@_settings_options
def demo(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """`tao round` on the bundled demo logs with the demo's settings (tao_pipeline/demo/demo.toml, unless
    --config names another file); once every prompt has been used, rerun all of them from the current champion."""
    from tao_pipeline.cli.runner import NothingNewError

    config_file = config_file or str(DEMO_CONFIG)
    try:
        _run_and_report(config_file, list(overrides))
    except NothingNewError:
        click.echo("every prompt was used by an earlier round: replaying them all from the current champion")
        _run_and_report(config_file, [*overrides, "flywheel.replay_fraction=1.0"])


def _run_and_report(config_file: str | None, overrides: list[str], rerun: str | None = None) -> None:
    from tao_pipeline.cli.runner import RoundWaitingError, run_round

    settings = _load(config_file, tuple(overrides))
    try:
        report = run_round(config_file, overrides, echo=click.echo, rerun=rerun)
    except (*_USER_ERRORS, RoundWaitingError) as error:
        raise click.ClickException(str(error)) from None
    if not report.completed:
        raise click.ClickException(
            f"{report.round_id} failed before its evaluation: {report.failure or 'see the run'}\n"
            f"`tao ui` shows the run {report.run_id} with every step's log"
        )
    click.echo(f"\n{report.round_id} finished in {report.seconds / 60:.1f} min\n")
    before_after = report.before_after.dropna(axis=1, how="all")  # no control column when the control is off
    table = before_after.astype(object).where(before_after.notna(), "-")
    click.echo(table.to_markdown(index=False, floatfmt=".3f"))
    if report.test_time is not None and len(report.test_time):
        click.echo("\nlabeled accuracy: the base model with k samples vs one greedy pass of each model\n")
        test_time = report.test_time.dropna(axis=1, how="all")
        test_time = test_time.astype(object).where(test_time.notna(), "-")
        click.echo(test_time.to_markdown(index=False, floatfmt=".3f"))
    click.echo(f"\ncontrol arm: {report.control}")
    if report.stages is not None and len(report.stages):
        stages = report.stages.dropna(axis=1, how="all")  # no error column when every step succeeded
        stages = stages.astype(object).where(stages.notna(), "-")
        click.echo("\nstages (wall time, peak resident memory of the process):\n")
        click.echo(stages.to_markdown(index=False))
    if report.warnings:
        click.echo("\nwarnings:\n" + "\n".join(f"- {warning}" for warning in report.warnings))
    click.echo(f"\n{report.verdict}\nchampion:    {report.champion}\ncheckpoint:  {report.checkpoint}")
    click.echo(f"lake:        {settings.lake_dir} (SQL: duckdb -readonly {settings.lake_dir / 'catalog.duckdb'})")
    click.echo(f"registry:    {settings.models_dir / 'registry.duckdb'}  (tao versions, tao lineage VERSION)")
    click.echo(f"report:      {report.report_path}")
    click.echo("UI:          tao ui")


@main.command()
@_settings_options
def ingest(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Ingest what is new now (the inbox, data.logs, the table source) without starting a round."""
    import dagster as dg

    from tao_pipeline.cli.instance import prepare_dagster_home
    from tao_pipeline.cli.runner import ingest_new_files

    settings = _load(config_file, overrides)
    prepare_dagster_home(settings)
    try:
        with dg.DagsterInstance.get() as instance:
            batches = ingest_new_files(instance, settings, SettingsSource(config_file, overrides), echo=click.echo)
    except _USER_ERRORS as error:
        raise click.ClickException(str(error)) from None
    if not batches:
        click.echo(f"nothing new to ingest in {settings.inbox_dir} or data.logs")
        return
    click.echo("\n" + ingested_table(Lake(settings.lake_dir), batches).to_markdown(index=False))


def ingested_table(lake: Lake, batches: list[str]) -> pd.DataFrame:
    """Kept and quarantined rows per ingested batch, as the lake holds them."""
    rows = []
    for batch in batches:
        kept, quarantined = (_partition(lake, table, batch) for table in ("usage_logs", "quarantined_rows"))
        sources = [*kept.get("source_file", []), *quarantined.get("source_file", [])]
        rows.append(
            {"file": sources[0] if sources else "", "batch": batch, "kept": len(kept), "quarantined": len(quarantined)}
        )
    return pd.DataFrame(rows, columns=["file", "batch", "kept", "quarantined"])


def _partition(lake: Lake, table: str, batch: str) -> pd.DataFrame:
    return lake.read(table, batch) if lake.exists(table, batch) else pd.DataFrame()


@main.command()
@_settings_options
def preflight(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Is there signal for label-free tuning? Sample up to preflight.prompts_per_task of the next round's prompts
    per task as the round will (it reuses the samples) and print, per task, agreement, pairs, accuracy and a verdict.

    Exits 0 whatever the verdicts: it is a report."""
    from tao_pipeline.cli.preflight import preflight as run_preflight
    from tao_pipeline.cli.preflight import print_report
    from tao_pipeline.evaluation.preflight import NoPromptsError

    _load(config_file, overrides)  # a bad setting: one line, named
    try:
        report = run_preflight(SettingsSource(config_file, overrides), echo=click.echo)
    except (*_USER_ERRORS, NoPromptsError) as error:
        raise click.ClickException(str(error)) from None
    print_report(report, click.echo)


@main.command()
@_settings_options
@click.option("--fix", is_flag=True, help="Repair what is safe to repair (the catalog's views); never moves a file.")
def doctor(config_file: str | None, overrides: tuple[str, ...], fix: bool) -> None:
    """Check this home: settings and scorers, lake files, catalog views, registry, checkpoints, inbox."""
    from tao_pipeline.cli.doctor import diagnose

    findings = diagnose(_load(config_file, overrides), fix=fix)
    for finding in findings:
        mark = "ok " if finding.ok else "!! "
        click.echo(
            f"{mark}{finding.area:9} {finding.detail}" + (f"\n             fix: {finding.fix}" if finding.fix else "")
        )
    problems = sum(not finding.ok for finding in findings)
    click.echo(f"\n{problems} problem(s)" if problems else "\nall good")
    if problems:
        sys.exit(1)


@main.command()
@_settings_options
def bootstrap(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Fetch and convert the configured base model (the embedded one by default)."""
    settings = _load(config_file, overrides)
    try:
        version = _store(config_file, overrides).champion(settings.model, log=click.echo)
    except _USER_ERRORS as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"champion: {version.version_id} at {version.path}")


@main.command()
@_settings_options
def versions(config_file: str | None, overrides: tuple[str, ...]) -> None:
    """List every model version in the registry (with its round's cost), and the promotion history."""
    from tao_pipeline.evaluation.round_cost import versions_with_costs

    store = _store(config_file, overrides)
    try:
        table, promotions, champion = store.versions(), store.promotions(), store.champion_id()
    except DuckDBLockTimeout as error:
        raise click.ClickException(f"the registry is locked by another process: {error}") from None
    if table.empty:
        click.echo("no versions yet: run `tao round`")
        return
    click.echo(f"champion: {champion}\n")
    click.echo(versions_with_costs(table.drop(columns=["hyperparameters", "path"])).to_markdown(index=False))
    click.echo("\npromotions:\n" + promotions.to_markdown(index=False))


@main.command()
@click.argument("version")
@_settings_options
@click.option("--rows", is_flag=True, help="Also print every usage-log row behind the version.")
def lineage(version: str, config_file: str | None, overrides: tuple[str, ...], rows: bool) -> None:
    """Show the rounds, pairs, prompts, usage logs and source files that produced VERSION."""
    from tao_pipeline.registry.lineage import version_lineage

    settings = _load(config_file, overrides)
    try:
        found = version_lineage(_store(config_file, overrides), Lake(settings.lake_dir), version)
    except ModelNotFoundError as error:
        raise click.ClickException(str(error)) from None
    click.echo("versions:\n" + found.chain.to_markdown(index=False))
    click.echo("\nrounds:\n" + found.rounds.to_markdown(index=False))
    if rows and not found.usage_logs.empty:
        columns = ["round", "log_id", "external_id", "source_file", "line_number", "prompt"]
        click.echo("\nusage logs:\n" + found.usage_logs[columns].to_markdown(index=False))


@main.command()
@click.argument("version")
@click.option("--reason", required=True, help="Recorded in the registry.")
@_settings_options
def promote(version: str, reason: str, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Make VERSION the champion by hand (recorded with the reason)."""
    store = _store(config_file, overrides)
    try:
        store.require_complete(version)
    except ModelNotFoundError as error:
        raise click.ClickException(str(error)) from None
    store.record_promotion(version, "promote", f"manual: {reason}")
    click.echo(f"champion: {version}")


@main.command()
@click.option("--reason", required=True, help="Recorded in the registry.")
@click.option("--to", "to_version", help="Version to restore (default: the champion before, usually its parent).")
@_settings_options
def rollback(reason: str, to_version: str | None, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Roll the champion back to the champion before it (or --to a version), recorded with the reason."""
    store = _store(config_file, overrides)
    try:
        target = store.require_complete(store.rollback_target(to_version)).version_id
        version = store.rollback(reason, target)
    except ModelNotFoundError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"champion: {version.version_id}")


@main.command()
@click.argument("version")
@_settings_options
def shadow(version: str, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Let VERSION answer every request in the background beside the champion (logged, never returned)."""
    _start_live(version, "shadow", 1.0, config_file, overrides)


@main.command()
@click.argument("version")
@click.option("--share", type=float, default=None, help="Share of conversations it answers (default: live.share).")
@_settings_options
def canary(version: str, share: float | None, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Let VERSION answer a share of the conversations, sticky per user; `tao canary stop` ends it."""
    if version == "stop":
        store = _store(config_file, overrides)
        ended = store.end_live("stopped by hand", {"reason": "tao canary stop"})
        click.echo(f"stopped: {ended.mode} of {ended.version_id}" if ended else "no live experiment is running")
        return
    _start_live(version, "canary", share if share is not None else _load(config_file, overrides).live.share,
                config_file, overrides)  # fmt: skip


def _start_live(version: str, mode: str, share: float, config_file: str | None, overrides: tuple[str, ...]) -> None:
    from tao_pipeline.live.evidence import next_stage

    settings = _load(config_file, overrides)
    store = _command_store(settings)
    try:
        running = store.start_live(version, mode, share)
    except (ModelNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    who = "every request, in the background" if mode == "shadow" else f"{running.share:.0%} of the conversations"
    click.echo(f"{mode}: {version} answers {who}, beside the champion {running.champion_version}")
    following = next_stage(settings.live.stages, mode)
    click.echo(f"passing it starts the {following} (live.stages)" if following else "passing it promotes it")
    click.echo("tao serve picks it up at its next registry poll; `tao live` shows the evidence")


@main.command()
@_settings_options
@click.option("--decide", is_flag=True, help="Act on the evidence now: promote or roll back if it is conclusive.")
def live(config_file: str | None, overrides: tuple[str, ...], decide: bool) -> None:
    """The live experiment, its evidence so far, and the always-valid decision it supports."""
    from tao_pipeline.live.evidence import live_decision, next_stage
    from tao_pipeline.live.sequential import PROMOTE

    settings = _load(config_file, overrides)
    store = _store(config_file, overrides)
    running = store.live_experiment()
    if running is None:
        click.echo("no live experiment is running (`tao shadow VERSION`, `tao canary VERSION --share 0.1`)")
        history = store.live_history()
        if not history.empty:
            click.echo("\nearlier:\n" + history.to_markdown(index=False))
        return
    outcome = live_decision(settings, store, running, act=decide)
    click.echo(f"{running.mode} of {running.version_id} beside {running.champion_version} since {running.started_at}")
    click.echo(outcome.table.to_markdown(index=False))
    decision, following = outcome.verdict.decision, next_stage(settings.live.stages, running.mode)
    if decision == PROMOTE and following is not None:
        decision = f"passes its {running.mode} (live.stages: {following} next)"
    click.echo(f"\n{decision}: {outcome.verdict.reason}")
    if outcome.acted:
        click.echo(f"acted: {outcome.acted}")


@main.command()
@click.argument("destination", type=click.Path(file_okay=False))
@click.option("--version", "version_id", help="Version to export (default: the champion).")
@_settings_options
def export(destination: str, version_id: str | None, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """Export a version as a merged model folder that transformers and vLLM load directly."""
    settings = _load(config_file, overrides)
    store = _store(config_file, overrides)
    try:
        version = version_id or store.champion(settings.model).version_id
        path = store.export(version, destination)  # a folder, or an s3:// prefix
    except (ModelNotFoundError, ExportRefused) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"exported {version} to {path}")


@main.command()
@_settings_options
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; localhost by default.")
def ui(config_file: str | None, overrides: tuple[str, ...], port: int, host: str) -> None:
    """Start `dagster dev` (webserver + daemon, so sensors and schedules run) on the home's instance.

    --config and --set reach every run, sensor tick and schedule tick of that code location.
    """
    from tao_pipeline.cli.instance import prepare_dagster_home

    settings = _load(config_file, overrides)
    try:
        check_scorers(settings.scoring, settings.cache_dir)  # what the code location would refuse to load with
    except ScorerOptionsError as error:
        raise click.ClickException(str(error)) from None
    home = prepare_dagster_home(settings)
    environment = {**os.environ, **SettingsSource(config_file, overrides).environment(), "DAGSTER_HOME": str(home)}
    command = [sys.executable, "-m", "dagster", "dev", "-m", "tao_pipeline.definitions", "-h", host, "-p", str(port)]
    click.echo(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={settings.dagster_home})")
    sys.exit(run_tied_to_this_process(command, environment))


@main.command()
@_settings_options
@click.option("--host", default=None, help="Bind address (serve.host; 127.0.0.1 by default).")
@click.option("--port", default=None, type=int, help="Port (serve.port; 8000 by default).")
@click.option("--engine", type=click.Choice(["local", "proxy"]), default=None, help="serve.engine.")
@click.option("--upstream", default=None, metavar="URL", help="proxy: the upstream's base URL (serve.upstream_url).")
def serve(
    config_file: str | None,
    overrides: tuple[str, ...],
    host: str | None,
    port: int | None,
    engine: str | None,
    upstream: str | None,
) -> None:
    """Serve the champion on an OpenAI-compatible API; log its traffic into the inbox; swap on promotion."""
    import uvicorn

    from tao_pipeline.serving.server import ServeRefused, build_server

    flags = {"serve.host": host, "serve.port": port, "serve.engine": engine, "serve.upstream_url": upstream}
    extra = tuple(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                  for key, value in flags.items() if value is not None)  # fmt: skip
    settings = _load(config_file, (*overrides, *extra))
    try:
        app = build_server(settings)
    except ServeRefused as error:
        raise click.ClickException(str(error)) from None
    where = f"http://{settings.serve.host}:{settings.serve.port}/v1"
    logged = f"logging requests into {settings.inbox_dir}" if settings.serve.log_requests else "not logging requests"
    click.echo(f"tao serve: OpenAI-compatible API on {where} (model {settings.serve.model_alias!r}); {logged}")
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port, log_level="info")


if __name__ == "__main__":
    main()

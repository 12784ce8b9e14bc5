"""`tao doctor`: is this home healthy? Every problem comes with what to do about it.

It checks the settings (and every scorer's options), the lake (each Parquet file readable, a
catalog view per table), the registry (reachable, a champion, every checkpoint folder complete),
the Dagster instance and the inbox. ``fix=True`` repairs what is safe to repair (missing or stale
catalog views); it never moves or deletes a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from tao_pipeline.cli.errors import one_line
from tao_pipeline.cli.instance import InstanceConfigError, is_tao_config, platform_home, postgres_url
from tao_pipeline.common.safe_files import shown
from tao_pipeline.data.ingest import scan_inbox
from tao_pipeline.data.ingest.inbox import ingested_digests
from tao_pipeline.data.lake import DuckDBFileError, DuckDBLockTimeout, Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.store import checkpoint_problem
from tao_pipeline.scoring import check_scorers
from tao_pipeline.scoring.catalog import ScorerOptionsError
from tao_pipeline.settings import TaoSettings

REGISTRY_WAIT_S = 10.0
POSTGRES_WAIT_S = 5


@dataclass(frozen=True)
class Finding:
    area: str
    ok: bool
    detail: str
    fix: str = ""


def diagnose(settings: TaoSettings, fix: bool = False) -> list[Finding]:
    """Every area's findings; an area that cannot even be examined is a finding too, never a crash."""
    areas = [
        ("settings", lambda: _scorers(settings)),
        ("lake", lambda: _lake(settings, fix)),
        ("registry", lambda: _registry(settings)),
        ("dagster", lambda: _instance(settings)),
        ("inbox", lambda: _inbox(settings)),
    ]
    findings = []
    for area, examine in areas:
        try:
            findings += examine()
        except (OSError, ValueError) as error:  # a corrupt or locked file, a folder that cannot be read
            findings.append(Finding(area, False, " ".join(str(error).split()), "see the message"))
    return findings


def _scorers(settings: TaoSettings) -> list[Finding]:
    try:
        check_scorers(settings.scoring, settings.cache_dir)
    except ScorerOptionsError as error:
        return [Finding("settings", False, str(error), "correct the option in your tao.toml (or --set)")]
    return [Finding("settings", True, f"valid; home {settings.home}")]


def _lake(settings: TaoSettings, fix: bool) -> list[Finding]:
    lake = Lake(settings.lake_dir)
    if not lake.root.is_dir():
        return [Finding("lake", True, "empty: nothing ingested yet")]
    findings = [
        Finding("lake", False, f"{path} cannot be read: {reason}", f"mv '{path}' '{path}.bad' and materialize it again")
        for path, reason in lake.unreadable_files()
    ]
    tables = [path.name for path in sorted(lake.root.iterdir()) if path.is_dir() and lake.partitions(path.name)]
    try:
        stale = [table for table in tables if not lake.view_is_current(table)]
        if stale and fix:
            for table in stale:
                lake.refresh_view(table)
            findings.append(Finding("catalog", True, f"recreated the views of {', '.join(stale)}"))
        elif stale:
            findings.append(
                Finding("catalog", False, f"no current view for {', '.join(stale)}", "run `tao doctor --fix`")
            )
    except DuckDBLockTimeout as error:
        findings.append(Finding("catalog", False, str(error), "close the read-write `duckdb` shell on the catalog"))
    except DuckDBFileError as error:
        findings.append(Finding("catalog", False, str(error), f"mv '{lake.catalog_path}' '{lake.catalog_path}.bad'"))
    files = sum(len(lake.partitions(table)) for table in tables)
    return findings or [Finding("lake", True, f"{len(tables)} tables, {files} partitions, all readable, views current")]


def _registry(settings: TaoSettings) -> list[Finding]:
    store = ModelStore(settings.models_dir, lock_timeout_s=REGISTRY_WAIT_S)
    try:
        versions, champion = store.versions(), store.champion_id()
    except DuckDBLockTimeout as error:
        return [Finding("registry", False, str(error), "close whatever holds the registry (a `duckdb` shell?)")]
    except DuckDBFileError as error:
        return [Finding("registry", False, str(error), "restore models/registry.duckdb from a backup")]
    if versions.empty:
        return [Finding("registry", True, "no versions yet: `tao bootstrap` or `tao round` registers the base model")]
    findings = []
    for version_id in versions["version_id"]:
        problem = checkpoint_problem(store.get(version_id))
        if problem:
            advice = "`tao rollback` first" if version_id == champion else "nothing uses it unless you promote it"
            findings.append(Finding("registry", False, f"{version_id}: {problem}", advice))
    summary = f"{len(versions)} versions, every checkpoint complete; champion {champion}"
    return findings or [Finding("registry", True, summary)]


def _instance(settings: TaoSettings) -> list[Finding]:
    if settings.storage.platform_instance:
        return [_platform_instance()]
    try:
        url = postgres_url(settings)
    except InstanceConfigError as error:
        return [Finding("dagster", False, str(error), "export the variable, or unset storage.postgres_url_env")]
    storage = "SQLite files" if url is None else f"Postgres (${settings.storage.postgres_url_env})"
    if url is not None:
        problem = _postgres_problem(url)
        if problem:
            return [Finding("dagster", False, f"Postgres at ${settings.storage.postgres_url_env}: {problem}",
                            "check the server, the URL and its credentials")]  # fmt: skip
    config = settings.dagster_home / "dagster.yaml"
    if not config.is_file():
        where = f"no instance yet at {settings.dagster_home} (storage: {storage})"
        return [Finding("dagster", True, f"{where}: `tao ui` or `tao round` writes it")]
    if not is_tao_config(config):
        return [Finding("dagster", True, f"instance at {settings.dagster_home}: your own dagster.yaml, left as it is")]
    return [Finding("dagster", True, f"instance at {settings.dagster_home}: {storage}, run monitoring and retries on")]


def _platform_instance() -> Finding:
    """The platform's instance (storage.platform_instance): where it is, its storage and run launcher."""
    try:
        home = platform_home()
    except InstanceConfigError as error:
        return Finding("dagster", False, str(error), "set DAGSTER_HOME, or unset storage.platform_instance")
    config = home / "dagster.yaml"
    if not config.is_file():
        return Finding("dagster", False, f"the platform's instance: no dagster.yaml at {home}",
                       "mount the instance there (the Dagster Helm chart's instance ConfigMap)")  # fmt: skip
    try:
        instance = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        return Finding("dagster", False, f"the platform's {config}: {one_line(error)}", "fix the file")
    storage = ", ".join(sorted(key for key in ("storage", "run_storage", "event_log_storage") if key in instance))
    launcher = (instance.get("run_launcher") or {}).get("class", "DefaultRunLauncher")
    return Finding("dagster", True, f"the platform's instance at {home} ({storage or 'SQLite files'}; {launcher}), "
                   "left as it is")  # fmt: skip


def _postgres_problem(url: str) -> str | None:
    """Why the instance's database cannot be used (None: it answers). Never shows the URL (it holds a password)."""
    import psycopg2

    try:
        connection = psycopg2.connect(url, connect_timeout=POSTGRES_WAIT_S)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()
    except psycopg2.Error as error:
        return " ".join(str(error).split()) or type(error).__name__
    return None


def _inbox(settings: TaoSettings) -> list[Finding]:
    scan = scan_inbox(settings, ingested_digests(Lake(settings.lake_dir)))
    findings = [
        Finding("inbox", False, f"{shown(path)} is refused: {why}", "replace it with a regular file in the inbox")
        for path, why in scan.refused
    ]
    for folder in ("processed", "failed"):
        entry = settings.inbox_dir / folder
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            findings.append(
                Finding(
                    "inbox",
                    False,
                    f"{entry} is not a real folder: nothing is archived there",
                    f"replace it: rm '{entry}'",
                )
            )
    waiting = f"; {len(scan.settling)} still being written" if scan.settling else ""
    return findings or [Finding("inbox", True, f"{settings.inbox_dir}: {len(scan.ready)} files ready{waiting}")]

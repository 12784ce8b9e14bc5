"""The Dagster instance every tao process shares: ``<home>/dagster/dagster.yaml``, written from the settings.

`tao ui` (its webserver and daemon), `tao round`, `tao ingest`, the runs and the container's entrypoint all
open the instance at ``$DAGSTER_HOME``. tao writes its ``dagster.yaml`` from the settings, marked as its own:

- storage in SQLite files beside it (the embedded default), or in Postgres when ``storage.postgres_url_env``
  names a variable holding a ``postgresql://`` URL (read by Dagster itself, so the password is never written);
- Dagster's run monitoring: a run still starting (or never started) after ``flywheel.run_start_timeout_s`` is
  failed, and so is a cancel that never finishes;
- Dagster's run retries, off by default (``max_retries: 0``): the round job asks for its own (its
  ``dagster/max_retries`` tag), and never after a stage failed on its own error, only after its process was
  lost. Ingest runs are retried by the usage-log sensor, which knows the file.

A ``dagster.yaml`` without tao's mark is a user's own and is never touched.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import yaml

from tao_pipeline.defs.constants import INGEST_STAGE, STAGE_TAG
from tao_pipeline.settings import TaoSettings

MARK = "# Written by tao from its settings; edit those (or replace this file: then tao leaves it alone)."
CANCEL_TIMEOUT_S = 180
MONITOR_POLL_S = 30
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class InstanceConfigError(ValueError):
    """The instance cannot be configured as the settings ask; the message names the setting."""


def instance_config(settings: TaoSettings) -> dict:
    """The instance's configuration (dagster.yaml's content) for these settings."""
    start_timeout_s = math.ceil(settings.flywheel.run_start_timeout_s)  # 0 would turn the check off
    config: dict = {
        "telemetry": {"enabled": False},
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": start_timeout_s,
            "cancel_timeout_seconds": CANCEL_TIMEOUT_S,
            "poll_interval_seconds": min(MONITOR_POLL_S, max(1, start_timeout_s // 4)),
        },
        "run_retries": {"enabled": True, "max_retries": 0, "retry_on_asset_or_op_failure": False},
        "concurrency": {
            "runs": {
                "tag_concurrency_limits": [
                    {"key": STAGE_TAG, "value": INGEST_STAGE, "limit": settings.flywheel.max_concurrent_ingest_runs}
                ]
            }
        },
    }
    variable = settings.storage.postgres_url_env
    if variable is not None:
        config["storage"] = {"postgres": {"postgres_url": {"env": variable}}}
    return config


def postgres_url(settings: TaoSettings) -> str | None:
    """The instance's Postgres URL from the environment (None: SQLite); one line naming what is wrong otherwise."""
    variable = settings.storage.postgres_url_env
    if variable is None:
        return None
    url = os.environ.get(variable, "")
    if not url.startswith(POSTGRES_SCHEMES):
        found = "is not set" if not url else "does not hold a postgresql:// URL"
        raise InstanceConfigError(
            f"storage.postgres_url_env={variable!r}: ${variable} {found} (e.g. postgresql://user:pass@host:5432/db)"
        )
    if importlib.util.find_spec("dagster_postgres") is None:
        raise InstanceConfigError(
            "storage.postgres_url_env is set but dagster-postgres is not installed: pip install 'tao-pipeline[deploy]'"
        )
    return url


def prepare_dagster_home(settings: TaoSettings) -> Path:
    """Write ``<home>/dagster/dagster.yaml`` from the settings (unless it is a user's own) and point
    ``$DAGSTER_HOME`` at it, so that everything this process starts opens the same instance. With
    storage.platform_instance, the platform's ``$DAGSTER_HOME`` instead, untouched."""
    postgres_url(settings)
    if settings.storage.platform_instance:
        return platform_home()
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    wanted = f"{MARK}\n" + yaml.safe_dump(instance_config(settings), sort_keys=False)
    current = config.read_text(encoding="utf-8", errors="replace") if config.exists() else None
    if current is None or (current != wanted and (current.startswith(MARK) or _earlier_default(current))):
        temporary = config.with_name(f".dagster.yaml.{os.getpid()}")
        temporary.write_text(wanted, encoding="utf-8")
        temporary.replace(config)  # a daemon reading it meanwhile sees the old file or the new one, never half
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def platform_home() -> Path:
    """$DAGSTER_HOME as the platform set it (storage.platform_instance), left as it is; one line if it is unset."""
    folder = os.environ.get("DAGSTER_HOME", "")
    if not folder:
        raise InstanceConfigError(
            "storage.platform_instance is set but $DAGSTER_HOME is not: set it to the folder holding the platform's "
            "dagster.yaml (the Dagster Helm chart sets it in every pod)"
        )
    return Path(folder)


def is_tao_config(path: Path) -> bool:
    """Whether the instance's dagster.yaml is the one tao writes (not a user's own)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").startswith(MARK)
    except OSError:
        return False


def _earlier_default(text: str) -> bool:
    """The file earlier versions of tao wrote (telemetry off, nothing else): tao's own, so it is replaced."""
    try:
        return yaml.safe_load(text) == {"telemetry": {"enabled": False}}
    except yaml.YAMLError:
        return False

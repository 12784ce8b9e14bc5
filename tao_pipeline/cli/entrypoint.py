"""The container's entrypoint: prepare the shared Dagster instance from the settings, then run the command.

Every process of a deployment (the code location's gRPC server, the webserver, the daemon, a run pod,
`tao serve`) starts through it, so they all open the same instance (``$DAGSTER_HOME/dagster.yaml``, with
Postgres when ``storage.postgres_url_env`` is set) and fail at once, in one line, on a bad setting or a
missing database URL instead of later inside a run. Under the Dagster Helm chart (storage.platform_instance) the
instance is the chart's, mounted at ``$DAGSTER_HOME``: the settings are still checked, the instance left alone.
"""

from __future__ import annotations

import os
import sys

from tao_pipeline.cli.errors import one_line
from tao_pipeline.cli.instance import prepare_dagster_home
from tao_pipeline.settings import SettingsSource

USAGE = "usage: tao-entrypoint COMMAND [ARG...]   e.g. tao-entrypoint dagster api grpc -m tao_pipeline.definitions"


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = SettingsSource.from_environment().load()
        if not settings.storage.platform_instance:  # the platform's instance is left to the platform (Helm chart)
            prepare_dagster_home(settings)
    except Exception as error:  # noqa: BLE001 - one line, never a traceback, before anything starts
        print(f"tao-entrypoint: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"tao-entrypoint: cannot run {command[0]!r}: {error.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())

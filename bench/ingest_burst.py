"""A burst of usage-log files through the real daemon: a run per file, or runs over ranges of files.

A server with several replicas, or one back from an outage, leaves many log files in the inbox at once.
Each arm starts a fresh home and `dagster-daemon` with the code location, drops ``--files`` files of
``--rows`` rows each into the inbox at once, and waits until every row is in the lake. The arms differ
only in ``flywheel.max_files_per_ingest_run``: 1 (a run, and a process, per file, as before) and the
default, 64 (the sensor puts the files ready at one tick in one run over their range of partitions).
Both run side by side in one invocation, on the same files; CPU is the whole machine's (/proc/stat)
from the files' arrival to the last row in the lake, so run it on a quiet machine.

    .venv/bin/python bench/ingest_burst.py [--files 24] [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tao_pipeline.cli.instance import prepare_dagster_home  # noqa: E402
from tao_pipeline.data.ingest import USAGE_TABLE  # noqa: E402
from tao_pipeline.data.lake import Lake  # noqa: E402
from tao_pipeline.settings import load_settings  # noqa: E402


def machine_cpu_seconds() -> float:
    """User + system time of every CPU since boot (the first line of /proc/stat), in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def write_config(home: Path, max_files: int) -> Path:
    config = home / "tao.toml"
    config.write_text(
        f'home = "{home}"\n[data]\nlogs = []\n'
        f"[flywheel]\nmin_new_prompts = 1000000\nsettle_seconds = 0\nsensor_interval_s = 5\n"
        f"max_files_per_ingest_run = {max_files}\nschedule_cron = '0 0 1 1 *'\n"
    )
    return config


def write_files(inbox: Path, files: int, rows: int) -> int:
    inbox.mkdir(parents=True, exist_ok=True)
    for number in range(files):
        lines = [
            json.dumps({"id": f"f{number}-r{row}", "prompt": f"File {number}: what is {row} + {number}?"})
            for row in range(rows)
        ]
        staging = inbox / f".file-{number:03d}.jsonl.tmp"
        staging.write_text("\n".join(lines) + "\n")
        staging.rename(inbox / f"burst-{number:03d}.jsonl")  # in one step, as the inbox contract asks
    return files * rows


def ingested_rows(lake_dir: Path) -> int:
    lake = Lake(lake_dir)
    return sum(len(lake.read(USAGE_TABLE, key)) for key in lake.partitions(USAGE_TABLE))


def ingested_files(lake_dir: Path) -> int:
    """Files whose rows are in the lake: a file's batch is written in one step (a cheap poll)."""
    return len(Lake(lake_dir).partitions(USAGE_TABLE))


def ingest_runs(dagster_home: Path) -> tuple[int, int]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name="ingest_usage_logs"))
        return len(runs), sum(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)


def arm(max_files: int, files: int, rows: int, timeout_s: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"tao-bench-burst-{max_files}-"))
    config = write_config(home, max_files)
    dagster_home = prepare_dagster_home(load_settings(config))  # the instance tao writes: queue, limits
    environment = {**os.environ, "TAO_CONFIG": str(config), "DAGSTER_HOME": str(dagster_home)}
    log = (home / "daemon.log").open("w")
    command = [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "tao_pipeline.definitions"]
    daemon = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(15)  # the daemon and its code server up, idle
        cpu0, start = machine_cpu_seconds(), time.monotonic()
        expected = write_files(home / "inbox", files, rows)
        while ingested_files(home / "lake") < files:
            if time.monotonic() - start > timeout_s:
                raise SystemExit(f"bench-ingest-burst: not every row ingested after {timeout_s:.0f}s (see {log.name})")
            time.sleep(0.5)
        seconds, cpu = time.monotonic() - start, machine_cpu_seconds() - cpu0
        ended = time.monotonic() + 60  # the last run records its success after its rows are in
        while time.monotonic() < ended and len(set(ingest_runs(dagster_home))) > 1:  # some run not succeeded yet
            time.sleep(1)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(30)
    runs, succeeded = ingest_runs(dagster_home)
    assert ingested_rows(home / "lake") == expected, "rows lost or duplicated"
    return {"max_files_per_ingest_run": max_files, "files": files, "rows": expected, "ingest runs": runs,
            "succeeded": succeeded, "seconds to every row in the lake": round(seconds, 1),
            "machine CPU-seconds": round(cpu, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args()
    table = pd.DataFrame([arm(max_files, args.files, args.rows, args.timeout_s) for max_files in (1, 64)])
    print(table.to_markdown(index=False))
    one, many = table.iloc[0], table.iloc[1]
    print(f"\nruns over ranges: {int(many['ingest runs'])} runs instead of {int(one['ingest runs'])}, "
          f"{one['seconds to every row in the lake'] / many['seconds to every row in the lake']:.1f}x sooner, "
          f"{one['machine CPU-seconds'] / many['machine CPU-seconds']:.1f}x less CPU")  # fmt: skip


if __name__ == "__main__":
    main()

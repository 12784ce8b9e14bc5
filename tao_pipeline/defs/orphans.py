"""Runs whose process died: found and marked failed, so that they are retried.

Dagster's run monitoring (turned on in the instance tao writes, cli/instance.py) fails a run that never
started or is stuck starting; with a run launcher that can check its workers (Kubernetes jobs, ...) it also
fails a run whose worker is gone. Dagster's default run launcher, one process per run on this machine, cannot
check its workers: a daemon killed with its process group, an out-of-memory kill or a reboot leaves the run
STARTED forever, and the flywheel would wait on it forever (a round "still running", a log file "in flight").
That one check is tao's: each sensor tick looks at its job's starting and started runs, and one whose worker
process (the pid Dagster records when the run starts) no longer exists is reported failed with the reason and
tagged (a retry inherits its parent's tags: only a failed run's tag means it was lost).
The ingestion sensor then retries the file as after any failed run; Dagster's run retries re-execute the round
from the stage it lost (the round job's ``dagster/max_retries``). A run that failed on its own error is never
retried automatically.
"""

from __future__ import annotations

import dagster as dg
import psutil

ORPHANED_TAG = "tao/orphaned"
PARTITION_TAG = "dagster/partition"
# A run over a range of partitions (an ingest run taking several log files) carries these instead.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# Set by Dagster on a failed run: whether its run retries will re-execute it, and the retry's id once they did.
WILL_RETRY_TAG = "dagster/will_retry"
RETRY_RUN_TAG = "dagster/auto_retry_run_id"


def fail_orphaned_runs(instance: dg.DagsterInstance, job_name: str) -> list[dg.DagsterRun]:
    """Report the job's runs whose worker process (recorded when it started) is gone as failed; return them."""
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return []  # other launchers run elsewhere and check their workers: Dagster's run monitoring covers them
    orphans = []
    started = dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
    for record in instance.get_run_records(started):
        pid = _worker_pid(instance, record.dagster_run.run_id)
        if pid is None or _alive(pid, started_at=record.start_time):
            continue  # no worker yet: Dagster's run monitoring fails it after its start timeout
        run = record.dagster_run
        instance.add_run_tags(run.run_id, {ORPHANED_TAG: f"pid {pid}"})
        instance.report_run_failed(
            run, message=f"tao: its process (pid {pid}) is gone: killed with the daemon, out of memory, or a reboot"
        )
        orphans.append(run)
    return orphans


def will_retry(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether Dagster's run retries will re-execute this failed run (its tag, set when the failure was reported,
    so read again: ``run`` may be the object from before)."""
    current = instance.get_run_by_id(run.run_id)
    return current is not None and current.tags.get(WILL_RETRY_TAG) == "true"


def retry_pending(instance: dg.DagsterInstance, job_name: str) -> dg.DagsterRun | None:
    """The job's newest run if it failed and Dagster's run retries are about to re-execute it (None otherwise):
    until the retry exists, nothing else may take its place."""
    [latest] = instance.get_runs(dg.RunsFilter(job_name=job_name), limit=1) or [None]
    if latest is None or latest.status != dg.DagsterRunStatus.FAILURE:
        return None
    if latest.tags.get(WILL_RETRY_TAG) == "true" and RETRY_RUN_TAG not in latest.tags:
        return latest
    return None


def _worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data is not None else None
        if pid is not None:
            return int(pid.value)
    return None


def _alive(pid: int, started_at: float | None) -> bool:
    """Whether ``pid`` is still the run's process (not gone, not a zombie, not a newer process given its pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_at is None or process.create_time() <= started_at + 5.0
    except psutil.NoSuchProcess:
        return False

"""Runs whose process died: found, marked failed, and retried by the sensors.

Dagster's default run launcher (one process per run on this machine) cannot tell that a run's
process is gone: a daemon killed with its process group, an out-of-memory kill or a reboot leaves
the run STARTED forever, and the flywheel would wait on it forever (a round "still running", a log
file "in flight"). Each sensor tick therefore looks at its job's STARTED runs: one whose worker
process (the pid Dagster records when the run starts) no longer exists is reported failed with
the reason and tagged. So is a run left NOT_STARTED or STARTING longer than
``flywheel.run_start_timeout_s`` without a process of its own: its launch was interrupted (the
daemon was killed between launching it and its worker starting), and nothing would ever start it.
The ingestion sensor then retries the file as after any failed run; the
round sensor resumes the round (a re-materialization that reuses every cached shard) up to
``MAX_RESUMES`` times. A run that failed on its own error is never retried automatically.
"""

from __future__ import annotations

import time

import dagster as dg
import psutil
from dagster._core.launcher import DefaultRunLauncher

from tao_pipeline.settings import FlywheelSettings

ORPHANED_TAG = "tao/orphaned"
RESUMED_FROM_TAG = "tao/resumed_from"
MAX_RESUMES = 2
PARTITION_TAG = "dagster/partition"
_START_TIMEOUT_S = FlywheelSettings.model_fields["run_start_timeout_s"].default
_WATCHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def fail_orphaned_runs(
    instance: dg.DagsterInstance, job_name: str, start_timeout_s: float = _START_TIMEOUT_S
) -> list[dg.DagsterRun]:
    """Report the job's runs whose process is gone, or never came, as failed; return them."""
    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []  # other launchers run elsewhere; Dagster's run monitoring covers them
    orphans = []
    for record in instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=_WATCHED)):
        found = _why_orphaned(instance, record, start_timeout_s)
        if found is None:
            continue
        tag, reason = found
        run = record.dagster_run
        instance.add_run_tags(run.run_id, {ORPHANED_TAG: tag})
        instance.report_run_failed(run, message=f"tao: {reason}")
        orphans.append(run)
    return orphans


def _why_orphaned(instance: dg.DagsterInstance, record, start_timeout_s: float) -> tuple[str, str] | None:
    """A short tag and the reason why the run can never finish, or None while it still may."""
    pid = _worker_pid(instance, record.dagster_run.run_id)
    if pid is not None:
        if _alive(pid, started_at=record.start_time):
            return None
        return f"pid {pid}", f"its process (pid {pid}) is gone: killed with the daemon, out of memory, or a reboot"
    if record.dagster_run.status == dg.DagsterRunStatus.STARTED:
        return None  # started by another launcher's worker, which left no pid to check
    waited = time.time() - record.update_timestamp.timestamp()
    if waited < start_timeout_s:
        return None
    return "never started", (
        f"{record.dagster_run.status.value} for {waited:.0f}s with no process: its launch was interrupted "
        f"(flywheel.run_start_timeout_s={start_timeout_s:g})"
    )


def round_to_resume(instance: dg.DagsterInstance, job_name: str) -> dg.RunRequest | None:
    """A rerun of the newest round if its last run was orphaned, until it has been resumed MAX_RESUMES times."""
    [latest] = instance.get_runs(dg.RunsFilter(job_name=job_name), limit=1) or [None]
    if latest is None or latest.status != dg.DagsterRunStatus.FAILURE or ORPHANED_TAG not in latest.tags:
        return None
    round_id = latest.tags.get(PARTITION_TAG)
    if round_id is None:
        return None
    runs = instance.get_runs(dg.RunsFilter(job_name=job_name, tags={PARTITION_TAG: round_id}))
    resumes = sum(RESUMED_FROM_TAG in run.tags for run in runs)
    if resumes >= MAX_RESUMES:
        return None
    return dg.RunRequest(
        run_key=f"{round_id}#resume-{resumes + 1}",
        partition_key=round_id,
        tags={RESUMED_FROM_TAG: latest.run_id},
    )


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

"""A run whose process died (a daemon killed with its process group, an OOM kill, a reboot) is found, marked
failed with the reason, and retried: the file re-ingested by the sensor, the round re-executed by Dagster's run
retries (twice at most, never after a stage's own error). A run that never started is Dagster's run monitoring's
to fail, as the instance tao writes asks. bench/flywheel.py does it for real: it SIGKILLs the daemon's process
group in the middle of a round (tests/test_flywheel_live.py)."""

import os
import subprocess
import uuid

import dagster as dg
import pytest
from dagster._core.events import EngineEventData
from dagster._core.storage.dagster_run import DagsterRun

from tao_pipeline.cli.instance import prepare_dagster_home
from tao_pipeline.defs.constants import INGEST_STAGE, STAGE_TAG
from tao_pipeline.defs.jobs import ROUND_RETRIES, ingest_job, tao_round_job
from tao_pipeline.defs.orphans import ORPHANED_TAG, WILL_RETRY_TAG, fail_orphaned_runs, retry_pending
from tao_pipeline.settings import load_settings


@pytest.fixture
def instance(tmp_path):
    """The instance tao writes for a home (Dagster's default run launcher, as `tao ui` and the daemon use)."""
    settings = load_settings(None, [f"home='{tmp_path}'", "flywheel.run_start_timeout_s=45"])
    home = prepare_dagster_home(settings)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def round_run(instance, pid: int | None, round_id="round-0001", status=dg.DagsterRunStatus.STARTED, job=None):
    tags = {"dagster/partition": round_id, **(tao_round_job.tags if job is None else {})}
    run = instance.add_run(DagsterRun(job_name=job or "tao_round", run_id=str(uuid.uuid4()), status=status, tags=tags))
    if pid is not None:
        instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    return run


def test_the_instance_turns_on_dagsters_run_monitoring_and_retries(instance):
    assert instance.run_monitoring_enabled and instance.run_monitoring_start_timeout_seconds == 45
    assert instance.run_monitoring_cancel_timeout_seconds > 0
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 0  # only jobs that ask
    assert not instance.run_retries_retry_on_asset_or_op_failure
    assert tao_round_job.tags["dagster/max_retries"] == str(ROUND_RETRIES)


def test_ingest_runs_queue_beyond_the_limit_instead_of_starting_together(instance):
    """One run per inbox file: a burst of files must not start a process each at once and time out at start."""
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": STAGE_TAG, "value": INGEST_STAGE, "limit": 2} in limits
    assert ingest_job.tags[STAGE_TAG] == INGEST_STAGE  # every ingest run carries it, from the sensor or the UI


def test_a_run_whose_process_is_gone_is_marked_failed_and_a_live_one_is_not(instance):
    orphan = round_run(instance, dead_pid())
    alive = round_run(instance, os.getpid(), round_id="round-0002")
    assert [run.run_id for run in fail_orphaned_runs(instance, "tao_round")] == [orphan.run_id]
    failed = instance.get_run_by_id(orphan.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE and ORPHANED_TAG in failed.tags
    assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
    assert fail_orphaned_runs(instance, "tao_round") == []  # once


def test_a_starting_run_whose_worker_died_is_failed_at_once_and_one_with_no_worker_is_left_to_dagster(instance):
    died = round_run(instance, dead_pid(), status=dg.DagsterRunStatus.STARTING)
    waiting = round_run(instance, None, round_id="round-0002", status=dg.DagsterRunStatus.STARTING)
    assert [orphan.run_id for orphan in fail_orphaned_runs(instance, "tao_round")] == [died.run_id]
    assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.STARTING


def test_a_lost_round_is_left_to_dagsters_retries_and_a_lost_ingest_to_the_sensor(instance):
    lost_round = round_run(instance, dead_pid())
    lost_ingest = round_run(instance, dead_pid(), round_id="inbox-a", job="tao_ingest")
    fail_orphaned_runs(instance, "tao_round")
    fail_orphaned_runs(instance, "tao_ingest")
    assert instance.get_run_by_id(lost_round.run_id).tags[WILL_RETRY_TAG] == "true"
    assert retry_pending(instance, "tao_round").run_id == lost_round.run_id  # no new round meanwhile
    assert instance.get_run_by_id(lost_ingest.run_id).tags[WILL_RETRY_TAG] == "false"  # the sensor's to retry
    assert retry_pending(instance, "tao_ingest") is None


def test_a_round_that_failed_on_its_own_error_is_not_retried(instance):
    @dg.asset
    def no_preference_pairs() -> None:
        raise ValueError("no preference pairs")

    result = dg.materialize([no_preference_pairs], instance=instance, tags=tao_round_job.tags, raise_on_error=False)
    assert not result.success
    assert instance.get_run_by_id(result.run_id).tags[WILL_RETRY_TAG] == "false"

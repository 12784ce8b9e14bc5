"""A run whose process died (a daemon killed with its process group, an OOM kill, a reboot) is found,
marked failed with the reason, and retried: the file re-ingested, the round resumed (twice at most).
bench/flywheel.py does it for real: it SIGKILLs the daemon's process group in the middle of a round."""

import os
import subprocess
import uuid

import dagster as dg
import pytest
from dagster._core.events import EngineEventData
from dagster._core.storage.dagster_run import DagsterRun

from tao_pipeline.defs.orphans import ORPHANED_TAG, RESUMED_FROM_TAG, fail_orphaned_runs, round_to_resume


@pytest.fixture
def instance(tmp_path):
    """A persistent instance with Dagster's default run launcher, as `tao ui` and the daemon use."""
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        yield instance


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def started_run(
    instance, pid: int, round_id: str = "round-0001", status=dg.DagsterRunStatus.STARTED, **tags
) -> DagsterRun:
    run = instance.add_run(
        DagsterRun(
            job_name="tao_round",
            run_id=str(uuid.uuid4()),
            status=status,
            tags={"dagster/partition": round_id, **tags},
        )
    )
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))
    return run


def test_a_run_whose_process_is_gone_is_marked_failed_and_a_live_one_is_not(instance):
    orphan = started_run(instance, dead_pid())
    alive = started_run(instance, os.getpid(), round_id="round-0002")
    assert [run.run_id for run in fail_orphaned_runs(instance, "tao_round")] == [orphan.run_id]
    failed = instance.get_run_by_id(orphan.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE and ORPHANED_TAG in failed.tags
    assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
    assert fail_orphaned_runs(instance, "tao_round") == []  # once


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED])
def test_a_run_whose_launch_was_interrupted_is_failed_after_the_start_timeout(instance, status):
    """The daemon killed between launching a run and its worker starting: no pid, no event, STARTING forever."""
    run = instance.add_run(
        DagsterRun(job_name="tao_round", run_id=str(uuid.uuid4()), status=status, tags={"dagster/partition": "r1"})
    )
    assert fail_orphaned_runs(instance, "tao_round", start_timeout_s=3600) == []  # it may still start
    assert instance.get_run_by_id(run.run_id).status == status
    assert [orphan.run_id for orphan in fail_orphaned_runs(instance, "tao_round", start_timeout_s=0.0)] == [run.run_id]
    failed = instance.get_run_by_id(run.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE and failed.tags[ORPHANED_TAG] == "never started"
    assert round_to_resume(instance, "tao_round").partition_key == "r1"


def test_a_starting_run_whose_worker_died_is_failed_at_once(instance):
    run = started_run(instance, dead_pid(), status=dg.DagsterRunStatus.STARTING)
    assert [orphan.run_id for orphan in fail_orphaned_runs(instance, "tao_round", start_timeout_s=3600)] == [run.run_id]


def test_an_orphaned_round_is_resumed_twice_at_most(instance):
    started_run(instance, dead_pid())
    fail_orphaned_runs(instance, "tao_round")
    for attempt in (1, 2):
        request = round_to_resume(instance, "tao_round")
        assert request.partition_key == "round-0001" and request.run_key == f"round-0001#resume-{attempt}"
        started_run(instance, dead_pid(), **request.tags)  # the resumed run dies too
        fail_orphaned_runs(instance, "tao_round")
    assert round_to_resume(instance, "tao_round") is None  # a person looks at it now


def test_a_round_that_failed_on_its_own_error_is_not_retried(instance):
    run = started_run(instance, os.getpid())
    instance.report_run_failed(run, message="ValueError: no preference pairs")
    assert round_to_resume(instance, "tao_round") is None
    assert RESUMED_FROM_TAG not in instance.get_run_by_id(run.run_id).tags

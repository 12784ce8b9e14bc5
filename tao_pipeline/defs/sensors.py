"""Sensors: ingest new usage-log files exactly once; open a round when enough new prompts arrived.

Each tick loads the settings once, through the settings resource (the source the code location
was started with). The tick interval itself is read when the code location loads.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from tao_pipeline.data.ingest import archive_ingested, pending_log_files, plan_ingest_runs
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.rounds import RoundDecision, decide_next_round
from tao_pipeline.defs.constants import INGEST_JOB, LOG_BATCHES, ROUND_JOB, ROUNDS
from tao_pipeline.defs.orphans import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    fail_orphaned_runs,
    retry_pending,
    will_retry,
)
from tao_pipeline.defs.partitions import log_batches_partitions, rounds_partitions
from tao_pipeline.defs.resources import TaoSettingsResource, startup_settings
from tao_pipeline.live.evidence import live_decision
from tao_pipeline.live.report import report_last_ending
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import TaoSettings

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
_ENDED_UNCOMMITTED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
_RECENT_INGEST_RUNS = 500  # searched for the latest run of a batch that is still pending


def build_usage_log_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="usage_log_sensor",
        job_name=INGEST_JOB,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def usage_log_sensor(
        context: dg.SensorEvaluationContext, settings: TaoSettingsResource
    ) -> dg.SensorResult | dg.SkipReason:
        """A log-batch partition per file ready in the inbox (or in data.logs), and ingest runs over ranges of
        them, after pulling rows appended to flywheel.table_source (if set) into a file.

        A file is ready once unchanged for flywheel.settle_seconds, and new until its rows are committed to
        the lake (keyed by its content hash, so a copy under another name is not new). A file in a run in flight
        waits; one whose run failed (or lost its process) is requested again. At most
        flywheel.max_concurrent_ingest_runs runs are in flight: files that arrive meanwhile wait, and the next
        run takes them all (up to flywheel.max_files_per_ingest_run), so ingestion catches up instead of
        queueing a run per file.
        """
        config = settings.get()
        for orphan in fail_orphaned_runs(context.instance, INGEST_JOB):
            context.log.warning(f"ingest run {orphan.run_id} lost its process: marked failed, its files are retried")
        in_flight = context.instance.get_runs(dg.RunsFilter(job_name=INGEST_JOB, statuses=_IN_FLIGHT))
        known = list(context.instance.get_dynamic_partitions(LOG_BATCHES))  # in the order they were added
        position = {key: index for index, key in enumerate(known)}
        busy = _batches_in_runs(in_flight, known, position)  # before the scan: a run ending meanwhile has committed
        scan = pending_log_files(config, Lake(config.lake_dir), set(known))
        archive_ingested(scan, config.inbox_dir)
        for refusal in scan.refusals():
            context.log.warning(refusal)
        retry = _failed(context.instance, known, position, {key for key in scan.ready if key in position} - busy)
        wanted = {key: path for key, path in scan.ready.items() if key not in position or key in retry}
        flywheel = config.flywheel
        free = flywheel.max_concurrent_ingest_runs - len(in_flight)
        runs = plan_ingest_runs(known, wanted, busy, flywheel.max_files_per_ingest_run, free)
        if not runs:
            return _nothing_to_request(scan, len(set(wanted) - busy), len(in_flight), config.inbox_dir)
        new = [key for run in runs for key in run if key not in position]
        return dg.SensorResult(
            run_requests=[_ingest_request(run, scan.ready) for run in runs],
            dynamic_partitions_requests=[log_batches_partitions.build_add_request(new)] if new else [],
            cursor=max(key for run in runs for key in run),
        )

    return usage_log_sensor


def build_round_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_prompts_round_sensor",
        job_name=ROUND_JOB,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def new_prompts_round_sensor(
        context: dg.SensorEvaluationContext, settings: TaoSettingsResource
    ) -> dg.SensorResult | dg.SkipReason:
        """Open the next round once flywheel.min_new_prompts prompts are unused by any round; report a round
        whose run lost its process as failed, for Dagster's run retries (see :mod:`tao_pipeline.defs.orphans`)."""
        config = settings.get()
        for orphan in fail_orphaned_runs(context.instance, ROUND_JOB):
            then = "Dagster retries it" if will_retry(context.instance, orphan) else "its retries are spent: look at it"
            context.log.warning(f"round run {orphan.run_id} lost its process: marked failed, {then}")
        decision = round_decision(context.instance, config, config.flywheel.min_new_prompts)
        if decision.round_id is None:
            return dg.SkipReason(decision.reason)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=decision.round_id, partition_key=decision.round_id)],
            dynamic_partitions_requests=[rounds_partitions.build_add_request([decision.round_id])],
            cursor=decision.round_id,
        )

    return new_prompts_round_sensor


def build_live_sensor(interval_s: int) -> dg.SensorDefinition:
    @dg.sensor(name="live_decision_sensor", minimum_interval_seconds=interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING)  # fmt: skip
    def live_decision_sensor(
        context: dg.SensorEvaluationContext, settings: TaoSettingsResource
    ) -> dg.SensorResult | dg.SkipReason:
        """While a challenger is shadowed or canaried (`tao shadow`, `tao canary`), judge its live answers
        with the always-valid test and act: promote it, or roll it back. The decision, with its evidence,
        is recorded in the registry and as an observation of the ``champion`` asset."""
        config = settings.get()
        store = ModelStore(config.models_dir)
        experiment = store.live_experiment()
        if experiment is None:
            # One ended elsewhere (tao serve's error guard, tao canary stop): its round's report learns how.
            ending = report_last_ending(store, config.reports_dir, context.cursor)
            if ending is not None and ending != context.cursor:
                context.update_cursor(ending)
            return dg.SkipReason("no live experiment is running")
        outcome = live_decision(config, store, experiment, act=True)
        if outcome.acted is None:
            return dg.SkipReason(f"{experiment.mode} of {experiment.version_id}: {outcome.verdict.reason}")
        context.log.info(f"live decision: {outcome.acted} ({outcome.verdict.reason})")
        observation = dg.AssetObservation(
            asset_key=dg.AssetKey("champion"),
            metadata={
                "live_decision": outcome.verdict.decision,
                "challenger": experiment.version_id,
                "mode": experiment.mode,
                "evidence": outcome.verdict.reason,
                "pairs": outcome.verdict.n,
                "arms": dg.MetadataValue.md(outcome.table.to_markdown(index=False)),
            },
        )
        return dg.SensorResult(asset_events=[observation])

    return live_decision_sensor


def _batches_in_runs(runs: list[dg.DagsterRun], known: list[str], position: dict[str, int]) -> set[str]:
    """The log batches these ingest runs cover: a run's partition, or every partition of its range."""
    return {key for run in runs for key in _covered(run, known, position)}


def _covered(run: dg.DagsterRun, known: list[str], position: dict[str, int]) -> list[str]:
    start, end = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
    if start in position and end in position:
        return known[position[start] : position[end] + 1]
    return [run.tags[PARTITION_TAG]] if PARTITION_TAG in run.tags else []


def _failed(instance: dg.DagsterInstance, known: list[str], position: dict[str, int], pending: set[str]) -> set[str]:
    """Known batches, still not in the lake, whose latest ingest run failed or was canceled: taken again.
    One whose run succeeded without committing it (an unreadable file configured in data.logs, quarantined
    and left in place) is not: retrying it would read it every tick."""
    if not pending:
        return set()
    latest: dict[str, dg.DagsterRun] = {}
    for run in instance.get_runs(dg.RunsFilter(job_name=INGEST_JOB), limit=_RECENT_INGEST_RUNS):  # newest first
        for key in pending.intersection(_covered(run, known, position)):
            latest.setdefault(key, run)
    for key in pending - set(latest):  # last ingested long ago: by its own run, as a partition
        for run in instance.get_runs(_partition_runs(key), limit=1):
            latest[key] = run
    return {key for key, run in latest.items() if run.status in _ENDED_UNCOMMITTED}


def _partition_runs(key: str) -> dg.RunsFilter:
    return dg.RunsFilter(job_name=INGEST_JOB, tags={PARTITION_TAG: key})


def _nothing_to_request(scan, waiting: int, in_flight: int, inbox: Path) -> dg.SkipReason:
    if waiting:
        return dg.SkipReason(
            f"{waiting} log file(s) ready wait for one of the {in_flight} ingest runs in flight to end "
            "(flywheel.max_concurrent_ingest_runs); the next run takes them all"
        )
    return dg.SkipReason(scan.describe(inbox))


def _ingest_request(keys: list[str], ready: dict[str, Path]) -> dg.RunRequest:
    """The run for one file (a partition) or several (a range of consecutive partitions, a file each).
    No run key: the runs in flight, read each tick, are what keeps a file from being requested twice."""
    if len(keys) == 1:
        return dg.RunRequest(partition_key=keys[0], run_config=_ingest_config({"path": str(ready[keys[0]])}))
    paths = {key: str(ready[key]) for key in keys}
    tags = {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}
    return dg.RunRequest(tags=tags, run_config=_ingest_config({"paths": paths}))


def _ingest_config(config: dict) -> dict:
    return {"ops": {"usage_logs": {"config": config}}}


def round_decision(instance: dg.DagsterInstance, settings: TaoSettings, min_unused: int) -> RoundDecision:
    """The round rule (:func:`decide_next_round`), after waiting for a round run still in flight.
    Shared by the sensor and the schedule."""
    running = instance.get_runs(dg.RunsFilter(job_name=ROUND_JOB, statuses=_IN_FLIGHT), limit=1)
    if running:
        return RoundDecision(None, f"{running[0].tags.get(PARTITION_TAG, 'a round')} is still running")
    lost = retry_pending(instance, ROUND_JOB)
    if lost is not None:
        return RoundDecision(None, f"{lost.tags.get(PARTITION_TAG, 'a round')} lost its process: Dagster retries it")
    return decide_next_round(Lake(settings.lake_dir), instance.get_dynamic_partitions(ROUNDS), min_unused)


@dg.definitions
def sensors() -> dg.Definitions:
    interval_s = startup_settings().flywheel.sensor_interval_s
    return dg.Definitions(
        sensors=[build_usage_log_sensor(interval_s), build_round_sensor(interval_s), build_live_sensor(interval_s)]
    )

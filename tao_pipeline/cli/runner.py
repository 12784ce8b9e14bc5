"""Running the flywheel headlessly through Dagster: ingest new log files, then one round.

The CLI and the tests drive Dagster here exactly as the daemon would: the same code location
(its jobs, assets, checks and resources), the same round rule, and the same instance
(``<home>/dagster``), so every run shows up in the UI. The CLI's settings reach the runs the way
a launchpad's do: as the settings resource's config in the run config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from tao_pipeline.cli.instance import prepare_dagster_home
from tao_pipeline.common.safe_files import shown
from tao_pipeline.data.ingest import InboxScan, archive_ingested, pending_log_files
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.rounds import decide_next_round
from tao_pipeline.definitions import load_definitions
from tao_pipeline.defs.constants import INGEST_JOB, LOG_BATCHES, MIRROR_JOB, ROUND_JOB, ROUNDS
from tao_pipeline.defs.jobs import round_run_tags
from tao_pipeline.evaluation import VERDICTS_TABLE, RoundVerdict, summarize, tuned_vs_sampling_table
from tao_pipeline.registry.policy import live_status, round_starting_model, starting_weights
from tao_pipeline.registry.store import ModelStore
from tao_pipeline.scoring import check_scorers
from tao_pipeline.settings import SettingsSource, TaoSettings

# Runs started here print nothing of Dagster's own log (its step failures carry stack traces): the CLI
# prints each run's outcome itself, one line per stage and per warning (see stage_timings, run_warnings).
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
_GATE_NOT_PASSED = "DagsterAssetCheckFailedError"  # a blocking check said no: an outcome, not a failure
# No pool limit here: a run killed in-process (SIGKILL, power loss) would keep its "gpu" slot
# claimed and block every later run. Rounds are serialized by the round sensor instead; a
# deployment sets the limit with `dagster instance concurrency set gpu 1` (docs/deployment.md).


class NothingNewError(RuntimeError):
    """No prompt is left that a round has not used."""


class RoundWaitingError(RuntimeError):
    """An open round has not taken its prompts yet; another would count them twice."""


@dataclass
class RoundReport:
    round_id: str
    completed: bool
    seconds: float
    promoted: bool = False
    before_after: pd.DataFrame | None = None
    test_time: pd.DataFrame | None = None
    control: str = ""
    verdict: str = ""
    report_path: str = ""
    champion: str = ""
    checkpoint: str = ""
    ingested: list[str] = field(default_factory=list)
    stages: pd.DataFrame | None = None
    run_id: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def failure(self) -> str | None:
        """The first failed stage and its error, e.g. "tuned_checkpoint: ValueError: no preference pairs ..."."""
        if self.stages is None:
            return None
        failed = self.stages[self.stages["status"] == "failure"]
        return None if failed.empty else f"{failed['stage'].iloc[0]}: {failed['error'].iloc[0]}"


def stage_timings(instance: dg.DagsterInstance, run_id: str) -> pd.DataFrame:
    """Wall time per step of a run (from the event log), each asset's recorded peak memory, and the
    error of a step that failed."""
    wanted = {
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.ASSET_MATERIALIZATION,
    }
    started, rows = {}, {}
    for record in instance.all_logs(run_id, of_type=wanted):
        event, step = record.dagster_event, record.step_key
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[step] = record.timestamp
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            memory = event.event_specific_data.materialization.metadata.get("peak_rss_mb")
            rows.setdefault(step, {})["peak_rss_mb"] = memory.value if memory is not None else None
        elif step in started:
            status = event.event_type.value.split("_")[-1].lower()
            error = event.event_specific_data.error if event.event_type == dg.DagsterEventType.STEP_FAILURE else None
            if error is not None and error.cls_name == _GATE_NOT_PASSED:
                status, error = "did not pass", None  # the promotion gate refused: the verdict says why
            rows.setdefault(step, {}).update(seconds=round(record.timestamp - started[step], 1), status=status)
            if error is not None:
                rows[step]["error"] = _root_cause(error)
    table = pd.DataFrame(
        [{"stage": step, **values} for step, values in rows.items()],
        columns=["stage", "seconds", "peak_rss_mb", "status", "error"],
    )
    return table.sort_values("stage", key=lambda s: s.map(list(started).index)).reset_index(drop=True)


def run_warnings(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What the run's steps logged at WARNING or above, one line each, prefixed with the step."""
    found = []
    for record in instance.all_logs(run_id):
        if record.dagster_event is None and record.level >= logging.WARNING and record.user_message:
            found.append(f"{record.step_key or 'run'}: {' '.join(record.user_message.split())}")
    return found


def _root_cause(error) -> str:
    """The user's own exception inside Dagster's wrapping errors, as "Type: message" on one line."""
    while error.cause is not None:
        error = error.cause
    return " ".join(error.message.split()) or error.cls_name


def code_location() -> dg.Definitions:
    """The code location, loaded and resolved as Dagster's own processes do it: inside an instance's
    context, which the loader consults (never one an earlier instance of this process left behind)."""
    with dg.DagsterInstance.ephemeral():
        definitions = load_definitions()
        definitions.get_repository_def()  # resolved here, once; later lookups reuse it
        return definitions


def run_config(source: SettingsSource, **extra) -> dict:
    """Run config that hands ``source`` to the settings resource, as a launchpad run would."""
    settings = {"config": {"config_file": source.config_file, "overrides": list(source.overrides)}}
    return {**QUIET_RUN_CONFIG, "resources": {"settings": settings}, **extra}


def ingest_new_files(
    instance: dg.DagsterInstance,
    settings: TaoSettings,
    source: SettingsSource,
    echo: Callable[[str], None],
    definitions: dg.Definitions | None = None,
) -> list[str]:
    """Materialize a usage_logs partition for every inbox, table-source or data.logs file not in the lake
    yet, once the inbox files still being written have settled (waiting for them a little)."""
    job = (definitions or code_location()).resolve_job_def(INGEST_JOB)
    known = set(instance.get_dynamic_partitions(LOG_BATCHES))
    scan = settled_scan(settings, known, echo)
    archive_ingested(scan, settings.inbox_dir)
    for refusal in scan.refusals():
        echo(refusal)
    for key, path in scan.ready.items():
        if key not in known:
            instance.add_dynamic_partitions(LOG_BATCHES, [key])
        echo(f"ingesting {shown(path)} as {key}")
        result = job.execute_in_process(
            instance=instance,
            partition_key=key,
            run_config=run_config(source, ops={"usage_logs": {"config": {"path": str(path)}}}),
        )
        for warning in run_warnings(instance, result.run_id):
            echo(f"  {warning}")
    return list(scan.ready)


def settled_scan(settings: TaoSettings, known: set[str], echo: Callable[[str], None]) -> InboxScan:
    """The inbox, after waiting (at most flywheel.settle_seconds, plus a second) for files still changing;
    a file still changing after that is left for the next run."""
    lake = Lake(settings.lake_dir)
    scan = pending_log_files(settings, lake, known)
    if scan.settling:
        wait_s = settings.flywheel.settle_seconds + 1
        echo(f"waiting up to {wait_s:.0f}s for {len(scan.settling)} inbox file(s) still being written")
        deadline = time.monotonic() + wait_s
        while scan.settling and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            scan = pending_log_files(settings, lake, known)
    for path in scan.settling:
        echo(f"{path} is still changing: left for a later run (see the inbox contract in the README)")
    return scan


def _starting_model(settings: TaoSettings, models: ModelStore, round_id: str) -> str:
    """The model the round will tune, as its generation stage picks it (flywheel.start_from)."""
    lake = Lake(settings.lake_dir)
    start = round_starting_model(models, lake, round_id, settings.model, settings.flywheel.start_from, log=str)
    champion = models.champion_id()
    built_on = start.version_id if start.version_id == champion else f"{start.version_id} ({champion} serves)"
    if settings.flywheel.start_from != "base" or start.parent_version is None:
        return built_on
    weights = starting_weights(models, start.version_id, settings.flywheel.start_from)
    return f"{weights.version_id}'s weights on {built_on}'s answers (flywheel.start_from = base)"


def run_round(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    echo: Callable[[str], None] = print,
    rerun: str | None = None,
) -> RoundReport:
    """Ingest what is new, open the next round (a dynamic partition) and materialize all its stages.

    ``rerun`` re-materializes an existing round instead: it takes in any newly ingested prompts no
    other round used, keeps its starting model, and reuses every cached response and score.
    """
    source = SettingsSource(config_file, tuple(overrides or ()))
    settings = source.load()
    check_scorers(settings.scoring, settings.cache_dir)  # a bad scorer option fails now, not after generation
    tags = round_run_tags(settings.flywheel.round_run_tags)  # so does a bad Kubernetes config for the run's pod
    prepare_dagster_home(settings)
    models = ModelStore(settings.models_dir)
    models.champion(settings.model, log=echo)  # fetch the base model up front
    started = time.perf_counter()
    definitions = code_location()
    with dg.DagsterInstance.get() as instance:
        ingested = ingest_new_files(instance, settings, source, echo, definitions)
        round_id = rerun or _open_round(instance, settings)
        if rerun and rerun not in instance.get_dynamic_partitions(ROUNDS):
            raise NothingNewError(f"there is no round {rerun!r} to rerun")
        action = "re-materializing" if rerun else f"tuning {_starting_model(settings, models, round_id)}"
        echo(f"{round_id}: {action}")
        result = definitions.resolve_job_def(ROUND_JOB).execute_in_process(
            instance=instance,
            partition_key=round_id,
            run_config=run_config(source),
            tags=tags,  # from this round's settings, not those the code location was loaded with
            raise_on_error=False,
        )
        stages = stage_timings(instance, result.run_id)
        warnings = run_warnings(instance, result.run_id)
        if settings.storage.lake_mirror_url is not None:  # what the mirror sensors do under the daemon
            echo(f"mirroring the lake to {settings.storage.lake_mirror_url}")
            definitions.resolve_job_def(MIRROR_JOB).execute_in_process(instance=instance, run_config=run_config(source))
    report = RoundReport(
        round_id,
        Lake(settings.lake_dir).exists(VERDICTS_TABLE, round_id),
        time.perf_counter() - started,
        ingested=ingested,
        stages=stages,
        run_id=result.run_id,
        warnings=warnings,
    )
    if report.completed:
        _fill_report(report, settings)
    return report


def _open_round(instance: dg.DagsterInstance, settings: TaoSettings) -> str:
    """The next round by the rule the round sensor follows; by hand, one new prompt is enough (none when replaying)."""
    min_unused = 0 if settings.flywheel.replay_fraction > 0 else 1
    decision = decide_next_round(Lake(settings.lake_dir), instance.get_dynamic_partitions(ROUNDS), min_unused)
    if decision.waiting_round is not None:
        raise RoundWaitingError(f"{decision.reason}: rerun it with `tao round --rerun {decision.waiting_round}`")
    if decision.round_id is None and not Lake(settings.lake_dir).partitions("usage_logs"):
        raise NothingNewError(
            f"no usage logs yet: drop log files into {settings.inbox_dir} or list them in data.logs "
            "(`tao demo` runs a round on the bundled demo logs)"
        )
    if decision.round_id is None:
        raise NothingNewError(
            f"every ingested prompt was used by an earlier round: drop new logs into {settings.inbox_dir} "
            "or set flywheel.replay_fraction"
        )
    instance.add_dynamic_partitions(ROUNDS, [decision.round_id])
    return decision.round_id


def _fill_report(report: RoundReport, settings: TaoSettings) -> None:
    lake = Lake(settings.lake_dir)
    rows = lake.read("checkpoint_evaluation", report.round_id)
    verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, report.round_id))
    confidence = verdict.promotion.confidence or settings.evaluation.confidence
    report.before_after = summarize(rows, confidence)
    report.test_time = tuned_vs_sampling_table(rows, confidence)
    report.control = verdict.control.message
    report.report_path = str(settings.reports_dir / report.round_id / "report.md")
    store = ModelStore(settings.models_dir)
    report.champion = store.champion(settings.model).version_id
    report.checkpoint = str(lake.read("tuned_checkpoint", report.round_id)["path"].iloc[0])
    report.promoted = report.champion == verdict.challenger_version
    report.verdict = ("promoted: " if report.promoted else "not promoted: ") + verdict.promotion.reason
    live = live_status(store, verdict.challenger_version)
    if verdict.promote and not report.promoted and live != "no":
        report.verdict = f"passed the offline gate: {verdict.promotion.reason}\non live traffic: {live} (`tao live`)"
    if verdict.champion_collapse and settings.evaluation.auto_rollback:
        report.verdict += f"\nauto-rollback to {report.champion}: {verdict.champion_collapse}"

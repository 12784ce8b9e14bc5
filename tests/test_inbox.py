"""The inbox contract: nothing from outside the inbox gets in, a file still being written waits, every row
lands exactly once, a file's kept and quarantined rows commit together, and a failed file is retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from tao_pipeline.cli.runner import code_location, ingest_new_files
from tao_pipeline.data import lake as lake_module
from tao_pipeline.data.ingest import archive_file, ingest_log_batch, pending_log_files, scan_inbox
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.resources import TaoSettingsResource
from tao_pipeline.defs.sensors import build_usage_log_sensor
from tao_pipeline.settings import SettingsSource
from tests.helpers import inbox_settings, sample_logs, write_logs

SECRET = "sk-test-7d1e0c55"


@pytest.fixture
def inbox_home(tmp_path, monkeypatch):
    """A home with an inbox, no configured log files, and settle_seconds = 1."""
    return inbox_settings(tmp_path, monkeypatch, flywheel="settle_seconds = 1.0")


def aged(path: Path, seconds: float = 60) -> Path:
    """As if the file had been written ``seconds`` ago (and not touched since)."""
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def lake_text(settings) -> str:
    """Everything the lake holds, as text (every Parquet file, raw)."""
    return "".join(path.read_bytes().decode("latin-1") for path in settings.lake_dir.rglob("*.parquet"))


def tick(instance, **context):
    sensor = build_usage_log_sensor(interval_s=30)
    with dg.build_sensor_context(instance=instance, resources={"settings": TaoSettingsResource()}, **context) as ctx:
        return sensor(ctx)


def run_requests(instance, result) -> list[dg.ExecuteInProcessResult]:
    """What the daemon would do with a tick's result: add its partitions and run its requests."""
    if not isinstance(result, dg.SensorResult):
        return []
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    job = code_location().resolve_job_def("ingest_usage_logs")
    return [
        job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
            raise_on_error=False,
        )
        for request in result.run_requests
    ]


# -- nothing from outside the inbox gets in -------------------------------------------------------


def test_links_fifos_and_files_outside_are_never_read(inbox_home, tmp_path):
    settings = inbox_home
    outside = tmp_path / "secrets.jsonl"
    outside.write_text(json.dumps({"prompt": f"the key is {SECRET}"}) + "\n")
    aged(outside)
    (settings.inbox_dir / "passwd.jsonl").symlink_to("/etc/passwd")
    (settings.inbox_dir / "environ.jsonl").symlink_to("/proc/self/environ")
    (settings.inbox_dir / "secrets.jsonl").symlink_to(outside)
    os.mkfifo(settings.inbox_dir / "pipe.jsonl")  # opening it for reading would block forever
    legit = aged(write_logs(settings.inbox_dir / "legit.jsonl", sample_logs(3)))
    (settings.inbox_dir / "link-to-legit.jsonl").symlink_to(legit)  # even a link inside the inbox

    scan = pending_log_files(settings, Lake(settings.lake_dir))
    assert list(scan.ready.values()) == [legit]
    refused = {path.name: why for path, why in scan.refused}
    assert set(refused) == {"passwd.jsonl", "environ.jsonl", "secrets.jsonl", "pipe.jsonl", "link-to-legit.jsonl"}
    assert "symbolic link" in refused["passwd.jsonl"] and "a FIFO" in refused["pipe.jsonl"]

    with dg.instance_for_test() as instance:
        ingest_new_files(instance, settings, SettingsSource(), echo=lambda _: None)
    text = lake_text(settings)
    assert SECRET not in text and "root:" not in text  # neither the linked file nor /etc/passwd
    assert len(Lake(settings.lake_dir).query("SELECT * FROM usage_logs")) == 3


def test_a_link_swapped_in_after_the_scan_is_not_followed(inbox_home, tmp_path):
    settings = inbox_home
    path = aged(write_logs(settings.inbox_dir / "swap.jsonl", sample_logs(2)))
    [(key, _)] = pending_log_files(settings, Lake(settings.lake_dir)).ready.items()
    path.unlink()
    path.symlink_to("/etc/passwd")
    with pytest.raises(FileNotFoundError, match="no longer a regular file"):
        ingest_log_batch(path, settings, Lake(settings.lake_dir), key)
    assert not list(settings.lake_dir.rglob("*.parquet"))


# -- a file still being written --------------------------------------------------------------------


def test_in_progress_names_and_young_files_wait(inbox_home):
    settings = inbox_home
    for name in ("app.jsonl.tmp", "app.jsonl.partial", "app.part", ".app.jsonl"):
        aged(write_logs(settings.inbox_dir / name, sample_logs(2)))
    young = write_logs(settings.inbox_dir / "young.jsonl", sample_logs(2))
    now = time.time()
    scan = scan_inbox(settings, set(), now=now)
    assert scan.ready == {} and scan.settling == [young] and scan.refused == []
    assert list(scan_inbox(settings, set(), now=now + 1.1).ready.values()) == [young]
    (settings.inbox_dir / "app.jsonl.partial").rename(settings.inbox_dir / "app.jsonl")  # complete: renamed
    assert settings.inbox_dir / "app.jsonl" in scan_inbox(settings, set(), now=now + 1.1).ready.values()


def test_a_writer_appending_across_ticks_lands_every_row_exactly_once(inbox_home):
    """An app appends lines (pausing less than settle_seconds) while the sensor ticks and its runs run;
    a second app writes under a .partial name and renames. Every line is ingested once, none split."""
    settings = inbox_home
    appended, renamed = settings.inbox_dir / "app.jsonl", settings.inbox_dir / "batch.jsonl.partial"
    lines = [json.dumps({"id": f"a{i}", "prompt": f"What is {i} + {i}?", "task": "arithmetic"}) for i in range(40)]
    half = [json.dumps({"id": f"b{i}", "prompt": f"Name colour {i}.", "task": "short_answer"}) for i in range(10)]

    def app() -> None:
        with appended.open("a") as log, renamed.open("w") as batch:
            for i, line in enumerate(lines):
                # A line written in two pieces, as a buffered writer may flush it.
                log.write(line[:10])
                log.flush()
                time.sleep(0.05)
                log.write(line[10:] + "\n")
                log.flush()
                if i < len(half):
                    batch.write(half[i] + "\n")
                time.sleep(0.05)
        renamed.rename(settings.inbox_dir / "batch.jsonl")

    writer = threading.Thread(target=app)
    ticks = []
    with dg.instance_for_test() as instance:
        writer.start()
        while writer.is_alive():
            ticks.append(tick(instance))
            run_requests(instance, ticks[-1])
            time.sleep(0.3)
        writer.join()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list(settings.inbox_dir.glob("*.jsonl")):
            run_requests(instance, tick(instance))
            time.sleep(0.3)
    assert len(ticks) >= 5  # the app wrote across several ticks
    rows = Lake(settings.lake_dir).query("SELECT external_id FROM usage_logs")
    assert sorted(rows["external_id"]) == sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(10)])
    assert not list(settings.lake_dir.glob("quarantined_rows/*.parquet")) or (
        len(Lake(settings.lake_dir).query("SELECT * FROM quarantined_rows")) == 0
    )
    assert sorted(p.name for p in (settings.inbox_dir / "processed").iterdir()) == ["app.jsonl", "batch.jsonl"]


def test_tao_round_waits_for_a_file_still_being_written(tmp_path, monkeypatch):
    # 3 s to settle: on a loaded CI machine a second can pass between writing the file and the first look
    settings = inbox_settings(tmp_path, monkeypatch, flywheel="settle_seconds = 3.0")
    definitions = code_location()  # loaded first: a cold load may take longer than settle_seconds
    path = write_logs(settings.inbox_dir / "fresh.jsonl", sample_logs(3))
    written = path.stat().st_mtime
    echoed = []
    with dg.instance_for_test() as instance:
        [key] = ingest_new_files(instance, settings, SettingsSource(), echo=echoed.append, definitions=definitions)
    assert any("still being written" in line for line in echoed)
    received = Lake(settings.lake_dir).read("usage_logs", key)["received_at"].iloc[0]
    assert received.timestamp() >= written + settings.flywheel.settle_seconds  # read only once settled


# -- a file commits whole, a failed one is retried, two ingests of one file do not collide -----------


HOLD_LOCK = """
import sys, time, pathlib, duckdb
con = duckdb.connect(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.05)
con.close()
"""


def test_a_locked_catalog_loses_no_row_and_delays_only_the_views(inbox_home, tmp_path, monkeypatch):
    """A user's read-write DuckDB shell on the catalog: the file's kept and quarantined rows both land."""
    settings = inbox_home
    monkeypatch.setattr(lake_module, "LOCK_TIMEOUT_S", 1.0)
    lake = Lake(settings.lake_dir)
    path = aged(write_logs(settings.inbox_dir / "logs.jsonl", [*sample_logs(4), "{not json", {"prompt": ""}]))
    [(key, _)] = pending_log_files(settings, lake).ready.items()
    lake.root.mkdir(parents=True)
    held, release = tmp_path / "held", tmp_path / "release"
    shell = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lake.catalog_path), str(held), str(release)])
    try:
        while not held.exists():
            time.sleep(0.05)
        outcome = ingest_log_batch(path, settings, lake, key)
    finally:
        release.touch()
        shell.wait(timeout=30)
    assert outcome.summary.rows == 4 and outcome.summary.quarantined == 2
    assert "catalog" in outcome.summary.catalog_warning
    assert len(lake.read("usage_logs", key)) == 4 and len(lake.read("quarantined_rows", key)) == 2
    assert outcome.archived_to == settings.inbox_dir / "processed" / "logs.jsonl"


def test_a_failed_ingest_is_retried_on_a_later_tick(inbox_home, monkeypatch):
    settings = inbox_home
    aged(write_logs(settings.inbox_dir / "logs.jsonl", sample_logs(4)))
    from tao_pipeline.data.ingest import batch as batch_module

    real = batch_module.ingest_to_lake
    failures = iter([OSError("disk full")])

    def flaky(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_module, "ingest_to_lake", flaky)
    with dg.instance_for_test() as instance:
        requested = tick(instance)
        [first] = run_requests(instance, requested)
        assert not first.success and (settings.inbox_dir / "logs.jsonl").exists()
        retry = tick(instance)  # the same partition again, no new one
        assert [r.partition_key for r in retry.run_requests] == [r.partition_key for r in requested.run_requests]
        assert not retry.dynamic_partitions_requests
        [second] = run_requests(instance, retry)
        assert second.success
        assert isinstance(tick(instance), dg.SkipReason)  # committed: never again
    assert len(Lake(settings.lake_dir).query("SELECT * FROM usage_logs")) == 4


def test_a_second_ingest_of_the_same_file_is_a_no_op(inbox_home):
    settings = inbox_home
    lake = Lake(settings.lake_dir)
    path = aged(write_logs(settings.inbox_dir / "logs.jsonl", sample_logs(4)))
    [(key, _)] = pending_log_files(settings, lake).ready.items()
    first = ingest_log_batch(path, settings, lake, key)  # another process, faster
    second = ingest_log_batch(path, settings, lake, key)  # this one had scanned the file too
    assert first.summary.rows == 4 and second.skipped and "another process" in second.skipped
    assert archive_file(path, settings.inbox_dir, "processed") is None  # already archived: nothing to do
    assert len(lake.read("usage_logs", key)) == 4


def test_a_committed_file_left_in_the_inbox_is_archived_not_read_again(inbox_home):
    """A run that committed the rows but died before archiving: the next scan only moves the file."""
    settings = inbox_home
    lake = Lake(settings.lake_dir)
    path = aged(write_logs(settings.inbox_dir / "logs.jsonl", sample_logs(4)))
    [(key, _)] = pending_log_files(settings, lake).ready.items()
    from tao_pipeline.data.ingest import ingest_to_lake

    ingest_to_lake(path, settings.data, lake, key)  # committed, not archived
    with dg.instance_for_test() as instance:
        assert isinstance(tick(instance), dg.SkipReason)
    assert not path.exists() and (settings.inbox_dir / "processed" / "logs.jsonl").exists()

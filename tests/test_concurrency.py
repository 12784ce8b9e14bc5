"""Two runs at once never corrupt the DuckDB catalog, the model registry or each other's partitions.

Real OS processes (multiprocessing, spawn) write different partitions of the same lake tables,
create catalog views, hold the catalog's write lock like a user's SQL shell would, and query
the catalog (``Lake.query``) and the Parquet files (``Lake.sql`` over ``scan``) at the same time;
others register versions and promotions in ``registry.duckdb`` at once. A last test runs an
ingest and a tiny round through Dagster at the same time while this process reads the catalog
and the registry and watches, in /proc, how long either run keeps a DuckDB file open.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from tao_pipeline.data import lake as lake_module
from tao_pipeline.data.lake import DuckDBLockTimeout, Lake, connect_duckdb
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import ModelSettings, SettingsSource

SPAWN = multiprocessing.get_context("spawn")
SHARED_TABLES = ("alpha", "beta")
WRITERS = 3
PARTITIONS_PER_WRITER = 3
WRITES_PER_WRITER = 9  # each partition rewritten 3 times, so readers race with replacements


# -- process plumbing ----------------------------------------------------------------------


def _worker(result_file: str, function, *args) -> None:
    """Run ``function(*args)`` in a child process; its JSON result (or traceback) goes to result_file."""
    try:
        result = {"ok": True, "value": function(*args)}
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        result = {"ok": False, "error": traceback.format_exc()}
    Path(result_file).write_text(json.dumps(result, default=str))
    os._exit(0 if result["ok"] else 1)


class Workers:
    """Child processes started with spawn (a fresh interpreter each, as separate runs are)."""

    def __init__(self, tmp_path: Path):
        self.folder = tmp_path / "results"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.processes: list[tuple[str, multiprocessing.Process, Path]] = []

    def start(self, name: str, function, *args) -> multiprocessing.Process:
        result_file = self.folder / f"{name}.json"
        process = SPAWN.Process(target=_worker, args=(str(result_file), function, *args), name=name)
        process.start()
        self.processes.append((name, process, result_file))
        return process

    def join(self, timeout_s: float) -> dict[str, object]:
        """Every worker's value; fails the test with the child's traceback if one failed or hung."""
        deadline = time.monotonic() + timeout_s
        for _name, process, _ in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [name for name, process, _ in self.processes if process.is_alive()]
        for _name, process, _ in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        assert not hung, f"workers still running after {timeout_s}s: {hung}"
        values, failures = {}, []
        for name, process, result_file in self.processes:
            if not result_file.is_file():
                failures.append(f"{name}: exited {process.exitcode} without a result")
                continue
            result = json.loads(result_file.read_text())
            if result["ok"] and process.exitcode == 0:
                values[name] = result["value"]
            else:
                failures.append(f"{name} (exit {process.exitcode}):\n{result.get('error')}")
        assert not failures, "\n\n".join(failures)
        return values


def _wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


def _wait_for_start(start_flag: str) -> None:
    """In a worker, once its imports are done: say so, then wait for the others."""
    Path(f"{start_flag}.ready-{os.getpid()}").touch()
    _wait_for(Path(start_flag), timeout_s=180)


def _start_together(start_flag: Path, workers: int, timeout_s: float = 120.0) -> None:
    """Release the workers at once, when every one of them is ready."""
    deadline = time.monotonic() + timeout_s
    while len(list(start_flag.parent.glob(f"{start_flag.name}.ready-*"))) < workers:
        assert time.monotonic() < deadline, "workers never got ready"
        time.sleep(0.01)
    start_flag.touch()


# -- many writers and readers on one lake --------------------------------------------------


def _rows(writer: int, version: int) -> int:
    return 5 + (7 * writer + 3 * version) % 11


def partition_frame(table: str, writer: int, partition: str, version: int) -> pd.DataFrame:
    count = _rows(writer, version)
    return pd.DataFrame(
        {
            "table_name": [table] * count,
            "partition": [partition] * count,
            "writer": [writer] * count,
            "version": [version] * count,
            "expected_rows": [count] * count,
            "row": list(range(count)),
            "log_ids": [[f"{partition}-{version}-{i}"] for i in range(count)],
        }
    )


def last_versions(writer: int) -> dict[str, int]:
    """partition -> the version of the last write to it."""
    return {f"w{writer}-p{i % PARTITIONS_PER_WRITER}": i for i in range(WRITES_PER_WRITER)}


def lake_writer(root: str, writer: int, start_flag: str) -> dict:
    """Rewrite this writer's partitions of the shared tables; now and then start a table of its own."""
    _wait_for_start(start_flag)
    lake = Lake(root)
    slowest, unseen = 0.0, []
    for version in range(WRITES_PER_WRITER):
        partition = f"w{writer}-p{version % PARTITIONS_PER_WRITER}"
        tables = list(SHARED_TABLES)
        if version % 4 == 0:  # a table no one has written yet: its view must be created (the write lock)
            tables.append(f"own_w{writer}_{version}")
        for table in tables:
            started = time.perf_counter()
            lake.write(table, partition, partition_frame(table, writer, partition, version))
            slowest = max(slowest, time.perf_counter() - started)
            if not lake.view_is_current(table):  # read after write, from a new connection
                unseen.append(table)
        time.sleep(0.1)  # a step's pace: writes come between stretches of work
    return {"slowest_write_s": slowest, "views_unseen_after_write": unseen}


def catalog_holder(root: str, start_flag: str, stop_flag: str) -> dict:
    """Like a user's SQL shell: opens the catalog read-write again and again and redefines a view."""
    _wait_for_start(start_flag)
    lake, holds = Lake(root), 0
    while not Path(stop_flag).exists():
        with connect_duckdb(lake.catalog_path) as con:
            con.execute("CREATE OR REPLACE VIEW user_view AS SELECT 42 AS answer")
            time.sleep(0.02)  # hold the write lock a moment, as a person's statement would
        holds += 1
        time.sleep(0.1)
    return {"holds": holds}


def _check_partitions(frame: pd.DataFrame, where: str) -> list[str]:
    """Every partition seen must be whole and from one write: its rows all of one version, all there."""
    problems = []
    for (table, partition), rows in frame.groupby(["table_name", "partition"]):
        versions = set(rows["version"])
        if len(versions) != 1:
            problems.append(f"{where}: {table}/{partition} mixes versions {sorted(versions)}")
        elif len(rows) != rows["expected_rows"].iloc[0] or sorted(rows["row"]) != list(range(len(rows))):
            problems.append(f"{where}: {table}/{partition} has {len(rows)} of {rows['expected_rows'].iloc[0]} rows")
    return problems


def lake_reader(root: str, start_flag: str, stop_flag: str) -> dict:
    """Query the catalog views and the Parquet files in a loop while the writers run."""
    _wait_for_start(start_flag)
    lake = Lake(root)
    queries, during_writes, problems = 0, 0, []
    columns = "table_name, partition, version, expected_rows, row"
    while not Path(stop_flag).exists() or queries < 4:
        for table in SHARED_TABLES:
            seen = lake.query(f'SELECT {columns} FROM "{table}"')
            problems += _check_partitions(seen, f"catalog view {table}")
            problems += _check_partitions(lake.sql(f"SELECT {columns} FROM {lake.scan(table)}"), f"scan {table}")
            partition = f"w{queries % WRITERS}-p{queries // WRITERS % PARTITIONS_PER_WRITER}"
            problems += _check_partitions(lake.read(table, partition), f"read {table}/{partition}")
            queries += 1
            during_writes += not Path(stop_flag).exists()
        time.sleep(0.05)  # leave the writers some of the two cores
    return {"queries": queries, "during_writes": during_writes, "problems": problems}


def test_concurrent_writers_and_readers_keep_every_partition_and_the_catalog_intact(tmp_path):
    root = tmp_path / "lake"
    lake = Lake(root)
    for table in SHARED_TABLES:  # the shared views exist before the readers start
        lake.write(table, "seed", partition_frame(table, 99, "seed", 0))
        for writer in range(WRITERS):  # and every partition, so each write in the race replaces a file
            for i in range(PARTITIONS_PER_WRITER):
                lake.write(table, f"w{writer}-p{i}", partition_frame(table, writer, f"w{writer}-p{i}", -1))
    start, stop = tmp_path / "start", tmp_path / "stop"
    workers = Workers(tmp_path)
    writers = [workers.start(f"writer-{w}", lake_writer, str(root), w, str(start)) for w in range(WRITERS)]
    workers.start("reader-0", lake_reader, str(root), str(start), str(stop))
    workers.start("reader-1", lake_reader, str(root), str(start), str(stop))
    workers.start("shell", catalog_holder, str(root), str(start), str(stop))
    _start_together(start, workers=len(writers) + 3)
    for writer in writers:
        writer.join(120)
    stop.touch()
    results = workers.join(timeout_s=60)
    unseen = {name: value["views_unseen_after_write"] for name, value in results.items() if name.startswith("writer")}
    assert not any(unseen.values()), f"a view was missing right after its write: {unseen}"

    for name in ("reader-0", "reader-1"):
        assert results[name]["problems"] == [] and results[name]["queries"] >= 4, results[name]
    assert sum(results[name]["during_writes"] for name in ("reader-0", "reader-1")) > 0, results
    assert results["shell"]["holds"] > 0

    # Every partition holds exactly its last write, readable as Parquet and through the catalog.
    expected_total = {table: _rows(99, 0) for table in SHARED_TABLES}
    for writer in range(WRITERS):
        for partition, version in last_versions(writer).items():
            for table in SHARED_TABLES:
                back = lake.read(table, partition)
                back["log_ids"] = back["log_ids"].map(list)
                pd.testing.assert_frame_equal(back, partition_frame(table, writer, partition, version))
                expected_total[table] += len(back)
    for table in SHARED_TABLES:
        assert lake.partitions(table) == sorted(
            ["seed", *(f"w{w}-p{i}" for w in range(WRITERS) for i in range(PARTITIONS_PER_WRITER))]
        )
        assert not [p.name for p in (root / table).iterdir() if p.suffix != ".parquet"], "temp files left"
    counts = lake.query(
        "SELECT table_name, count(*) AS n FROM (SELECT table_name FROM alpha UNION ALL "
        "SELECT table_name FROM beta) GROUP BY table_name ORDER BY table_name"
    )
    assert dict(zip(counts["table_name"], counts["n"])) == expected_total

    # The catalog is a sound DuckDB file that any client opens, with every view in it.
    own_tables = {f"own_w{w}_{v}" for w in range(WRITERS) for v in range(0, WRITES_PER_WRITER, 4)}
    with duckdb.connect(str(lake.catalog_path), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert views == {*SHARED_TABLES, *own_tables, "user_view"}
        for table in own_tables:
            _, writer, version = table.split("_")
            assert con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == _rows(int(writer[1:]), int(version))


# -- the model registry --------------------------------------------------------------------


def registry_writer(models: str, base: str, writer: int, writers: int, count: int, flags: str) -> dict:
    _wait_for_start(str(Path(flags) / "start"))
    store = ModelStore(models)
    # Every process finds no champion at once; each must end up with the one base model.
    base_version = store.champion(ModelSettings(base=base), log=lambda _: None).version_id
    (Path(flags) / f"has-champion-{writer}").touch()
    for other in range(writers):  # nobody promotes before everyone has asked for the champion
        _wait_for(Path(flags) / f"has-champion-{other}")
    parent = base_version
    for i in range(count):
        version = f"w{writer}-v{i}"
        store.register(
            version,
            Path(models) / version,
            parent_version=parent,
            round_id=f"round-w{writer}",
            method="dpo+lora",
            hyperparameters={"writer": writer, "i": i},
            metrics={"steps": i},
        )
        store.add_metrics(version, {"heldout_win_rate": i / count, "writer": writer})
        store.record_promotion(version, "promote" if i % 2 == 0 else "reject", f"writer {writer} step {i}")
        parent = version
    return {"base": base_version}


def test_concurrent_processes_register_versions_and_promotions(tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    models = tmp_path / "models"
    flags = tmp_path / "flags"
    flags.mkdir()
    workers, writers, count = Workers(tmp_path), 3, 5
    for w in range(writers):
        workers.start(f"registry-{w}", registry_writer, str(models), str(base), w, writers, count, str(flags))
    _start_together(flags / "start", workers=writers)
    results = workers.join(timeout_s=120)

    store = ModelStore(models)
    assert {r["base"] for r in results.values()} == {"base-base-model"}
    versions = store.versions().set_index("version_id")
    assert len(versions) == 1 + writers * count
    promotions = store.promotions()
    # The base model was registered and promoted once, although every process found no champion.
    assert (promotions["reason"] == "configured base model").sum() == 1
    assert len(promotions) == 1 + writers * count
    for w in range(writers):
        chain = [v.version_id for v in store.ancestors(f"w{w}-v{count - 1}")]
        assert chain == [f"w{w}-v{i}" for i in reversed(range(count))] + ["base-base-model"]
        for i in range(count):
            row = versions.loc[f"w{w}-v{i}"]
            assert json.loads(row["metrics"]) == {"steps": i, "heldout_win_rate": i / count, "writer": w}
            assert json.loads(row["hyperparameters"]) == {"writer": w, "i": i}
            assert bool(row["promoted"]) == (i % 2 == 0)
    last_promoted = promotions[promotions["action"] == "promote"].iloc[-1]["version_id"]
    assert store.champion(ModelSettings(base=str(base))).version_id == last_promoted
    with duckdb.connect(str(store.registry_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM versions").fetchone()[0] == 1 + writers * count


# -- nobody keeps a DuckDB file open across a long step ------------------------------------


def long_step(lake_root: str, models: str, base: str, ready_flag: str, done_flag: str) -> dict:
    """A step that writes the lake and the registry, then works for a long time with both objects alive."""
    lake, store = Lake(lake_root), ModelStore(models)
    lake.write("candidate_responses", "round-0001", pd.DataFrame({"response_id": ["r1"], "round": ["round-0001"]}))
    assert len(lake.query("SELECT * FROM candidate_responses")) == 1
    champion = store.champion(ModelSettings(base=base), log=lambda _: None)
    store.register("round-0001-dpo-x", base, parent_version=champion.version_id, round_id="round-0001", method="dpo")
    Path(ready_flag).touch()
    _wait_for(Path(done_flag), timeout_s=60)  # "generating" / "training": the other process works meanwhile
    lake.write("candidate_responses", "round-0002", pd.DataFrame({"response_id": ["r2"], "round": ["round-0002"]}))
    store.record_promotion("round-0001-dpo-x", "promote", "after the long step")
    return {"views": sorted(lake.query("SELECT view_name FROM duckdb_views() WHERE NOT internal")["view_name"])}


def open_both_at_once(catalog: str, registry: str) -> str:
    """Open both files read-write with no waiting at all: fails if any process holds either."""
    with duckdb.connect(catalog) as con:
        con.execute("CREATE OR REPLACE VIEW from_elsewhere AS SELECT 1 AS x")
    with duckdb.connect(registry) as con:
        con.execute("INSERT INTO promotions VALUES ('elsewhere', 'note', 'opened during the long step', now())")
    return "ok"


def test_no_duckdb_file_is_held_open_across_a_long_step(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    lake_root, models = tmp_path / "lake", tmp_path / "models"
    ready, done = tmp_path / "ready", tmp_path / "done"
    workers = Workers(tmp_path)
    workers.start("long-step", long_step, str(lake_root), str(models), str(base), str(ready), str(done))
    _wait_for(ready)
    try:
        # The other process is mid-step with its Lake and ModelStore alive: no lock, no open file.
        open_both_at_once(str(lake_root / "catalog.duckdb"), str(models / "registry.duckdb"))
    finally:
        done.touch()
    assert workers.join(timeout_s=60)["long-step"]["views"] == ["candidate_responses", "from_elsewhere"]

    # And the other way round: this process holds its objects while another opens both files.
    lake, store = Lake(lake_root), ModelStore(models)
    assert len(lake.query("SELECT * FROM candidate_responses")) == 2
    assert store.champion(ModelSettings(base=str(base))).version_id == "round-0001-dpo-x"
    workers = Workers(tmp_path / "again")
    workers.start("opener", open_both_at_once, str(lake.catalog_path), str(store.registry_path))
    assert workers.join(timeout_s=60) == {"opener": "ok"}
    assert "elsewhere" in set(store.promotions()["version_id"])


def hold_open(path: str, read_only: bool, ready_flag: str, release_flag: str) -> int:
    """A user's `duckdb` shell left open on a file."""
    with duckdb.connect(path, read_only=read_only):
        Path(ready_flag).touch()
        _wait_for(Path(release_flag), timeout_s=60)
    return os.getpid()


def test_a_sql_shell_left_open_on_the_catalog(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    lake.write("scores", "round-0001", pd.DataFrame({"score": [0.5]}))
    monkeypatch.setattr(lake_module, "LOCK_TIMEOUT_S", 1.0)

    # A read-only shell: rounds keep writing partitions of existing tables, and reading.
    workers = Workers(tmp_path / "read-only")
    shell = workers.start(
        "shell", hold_open, str(lake.catalog_path), True, str(tmp_path / "ro"), str(tmp_path / "ro-done")
    )
    _wait_for(tmp_path / "ro")
    try:
        lake.write("scores", "round-0002", pd.DataFrame({"score": [0.75]}))
        assert lake.query("SELECT sum(score) AS s FROM scores")["s"].iloc[0] == 1.25
        # A new table's view needs the write lock: the wait ends with the holder named, not a hang.
        with pytest.raises(DuckDBLockTimeout, match=rf"PID {shell.pid}\b"):
            lake.write("pairs", "round-0002", pd.DataFrame({"pair_id": ["p"]}))
    finally:
        (tmp_path / "ro-done").touch()
    workers.join(timeout_s=30)
    assert lake.exists("pairs", "round-0002")  # the Parquet (the source of truth) was written
    lake.write("pairs", "round-0003", pd.DataFrame({"pair_id": ["q"]}))  # and the next write adds the view
    assert lake.query("SELECT count(*) AS n FROM pairs")["n"].iloc[0] == 2

    # A read-write shell locks everyone out until it closes: a clear error after the wait.
    workers = Workers(tmp_path / "read-write")
    shell = workers.start(
        "shell", hold_open, str(lake.catalog_path), False, str(tmp_path / "rw"), str(tmp_path / "rw-done")
    )
    _wait_for(tmp_path / "rw")
    try:
        started = time.monotonic()
        with pytest.raises(DuckDBLockTimeout, match="stayed locked"):
            lake.query("SELECT count(*) FROM scores")
        assert 0.9 < time.monotonic() - started < 10
    finally:
        (tmp_path / "rw-done").touch()
    workers.join(timeout_s=30)
    assert lake.query("SELECT count(*) AS n FROM scores")["n"].iloc[0] == 2


# -- an ingest and a round through Dagster at once -----------------------------------------

DUCKDB_FILES = ("catalog.duckdb", "registry.duckdb")


class OpenFileWatcher:
    """Samples /proc/<pid>/fd of some processes; records the longest a DuckDB file stayed open in each."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.01):
        self.pids, self.interval_s = pids, interval_s
        self.longest: dict[tuple[str, str], float] = {}
        self.samples = 0
        self._since: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _open_files(self, pid: int) -> set[str]:
        names = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return names
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            names.update(name for name in DUCKDB_FILES if target.endswith(name) or target.endswith(name + ".wal"))
        return names

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for who, pid in self.pids.items():
                open_now = self._open_files(pid)
                for name in DUCKDB_FILES:
                    key = (who, name)
                    if name in open_now:
                        self._since.setdefault(key, now)
                        self.longest[key] = max(self.longest.get(key, 0.0), now - self._since[key])
                    else:
                        self._since.pop(key, None)
            self.samples += 1
            self._stop.wait(self.interval_s)


def dagster_round(config: str, round_id: str, start_flag: str) -> dict:
    import dagster as dg

    from tao_pipeline.cli.runner import QUIET_RUN_CONFIG, prepare_dagster_home
    from tao_pipeline.defs.checks import challenger_beats_champion
    from tao_pipeline.defs.resources import build_resources
    from tao_pipeline.settings import load_settings
    from tests.helpers import round_assets

    prepare_dagster_home(load_settings(config))
    _wait_for_start(start_flag)
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [*round_assets(), challenger_beats_champion],
            partition_key=round_id,
            instance=instance,
            resources=build_resources(config),
            run_config=QUIET_RUN_CONFIG,
            raise_on_error=False,
        )
        failed = [event.step_key for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    return {"failed_steps": failed}


def dagster_ingest(config: str, start_flag: str) -> dict:
    import dagster as dg

    from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home
    from tao_pipeline.settings import load_settings

    settings = load_settings(config)
    prepare_dagster_home(settings)
    _wait_for_start(start_flag)
    with dg.DagsterInstance.get() as instance:
        return {"batches": ingest_new_files(instance, settings, SettingsSource(config), echo=lambda _: None)}


@pytest.mark.slow  # a round and an ingestion in two processes through Dagster: over 20 s (tests/time_budget.py)
def test_an_ingest_and_a_round_at_once_through_dagster(tmp_path, tiny_model_dir):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("watching open files needs /proc")
    import dagster as dg

    from tao_pipeline.cli.runner import ingest_new_files, prepare_dagster_home
    from tao_pipeline.settings import load_settings
    from tests.helpers import write_logs, write_tiny_config

    config = write_tiny_config(tmp_path, tiny_model_dir)
    settings = load_settings(config)
    prepare_dagster_home(settings)
    ModelStore(settings.models_dir).champion(settings.model, log=lambda _: None)
    with dg.DagsterInstance.get() as instance:
        [first_batch] = ingest_new_files(instance, settings, SettingsSource(str(config)), echo=lambda _: None)
        instance.add_dynamic_partitions("rounds", ["round-0001"])
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    new_files = {}
    for n in range(3):
        rows = [
            {"id": f"new-{n}-{i}", "prompt": f"What is {n} * {i}? Reply with just the number.", "task": "arithmetic"}
            for i in range(6)
        ]
        write_logs(settings.inbox_dir / f"new-{n}.jsonl", rows)
        new_files[f"new-{n}.jsonl"] = len(rows)

    start = tmp_path / "start"
    workers = Workers(tmp_path)
    pids = {
        "round": workers.start("round", dagster_round, str(config), "round-0001", str(start)).pid,
        "ingest": workers.start("ingest", dagster_ingest, str(config), str(start)).pid,
    }
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    waits = []
    with OpenFileWatcher(pids) as watcher:
        _start_together(start, workers=2)
        # Meanwhile someone reads the catalog and the registry, as `tao versions` or a SQL shell would.
        while any(process.is_alive() for _, process, _ in workers.processes):
            started = time.perf_counter()
            lake.query("SELECT count(*) FROM usage_logs")
            store.versions()
            waits.append(time.perf_counter() - started)
            time.sleep(0.25)
        results = workers.join(timeout_s=5)
    # The tiny random model may lose to its parent: then only the blocking check fails and the
    # champion is not materialized. Every other step succeeded.
    assert set(results["round"]["failed_steps"]) <= {"checkpoint_evaluation_challenger_beats_champion"}, results
    assert len(results["ingest"]["batches"]) == len(new_files)
    assert watcher.samples > 50 and len(waits) > 5
    assert max(waits) < 5.0, f"a reader waited {max(waits):.1f}s for the catalog or the registry"
    # A DuckDB file is open for a statement at a time (well under 0.2 s here, even on a loaded
    # machine), never across a step such as generation or training.
    assert all(seconds < 1.5 for seconds in watcher.longest.values()), watcher.longest

    # Each ingested file is whole, in its own partition, and the round's partitions agree with one another.
    batches = [first_batch, *results["ingest"]["batches"]]
    assert sorted(lake.partitions("usage_logs")) == sorted(batches)
    ingested = {
        Path(lake.read("usage_logs", b)["source_file"].iloc[0]).name: len(lake.read("usage_logs", b))
        for b in results["ingest"]["batches"]
    }
    assert ingested == new_files
    assert len(lake.read("usage_logs", first_batch)) == 24
    prompts = lake.read("raw_prompts", "round-0001")
    candidates = lake.read("candidate_responses", "round-0001")
    scores = lake.read("response_scores", "round-0001")
    pairs = lake.read("preference_pairs", "round-0001")
    checkpoint = lake.read("tuned_checkpoint", "round-0001").iloc[0]
    evaluation = lake.read("checkpoint_evaluation", "round-0001")
    assert set(prompts["round"]) == {"round-0001"} and len(prompts) >= 24
    train = set(prompts.loc[prompts["split"] == "train", "prompt_id"])
    assert set(candidates["prompt_id"]) == train and len(candidates) == 4 * len(train)
    assert sorted(scores["response_id"]) == sorted(candidates["response_id"])
    assert set(pairs["chosen_response_id"]) | set(pairs["rejected_response_id"]) <= set(candidates["response_id"])
    assert sorted(checkpoint["pair_ids"]) == sorted(pairs["pair_id"])
    assert len(evaluation) == (prompts["split"] == "heldout").sum()
    assert store.get(checkpoint["version_id"]).round == "round-0001"
    with duckdb.connect(str(lake.catalog_path), read_only=True) as con:
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for view in (
            "usage_logs",
            "quarantined_rows",
            "raw_prompts",
            "candidate_responses",
            "response_scores",
            "preference_pairs",
            "tuned_checkpoint",
            "checkpoint_evaluation",
        ):
            assert view in views
            con.execute(f'SELECT count(*) FROM "{view}"').fetchone()
        logged = con.execute("SELECT count(*) FROM usage_logs").fetchone()[0]
    assert logged == 24 + sum(new_files.values())
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    assert instance.get_materialized_partitions(dg.AssetKey("checkpoint_evaluation")) == {"round-0001"}
    assert instance.get_materialized_partitions(dg.AssetKey("usage_logs")) == set(batches)

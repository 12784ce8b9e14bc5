"""Clear errors, never a traceback: each of these names the problem in one line, at load time where it can."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.cli.runner import code_location, run_config
from tao_pipeline.data.lake import Lake, LakeFileError
from tao_pipeline.registry import ModelStore
from tao_pipeline.scoring import check_scorers
from tao_pipeline.scoring.catalog import ScorerOptionsError
from tao_pipeline.settings import OVERRIDES_ENV, SettingsError, SettingsSource, load_settings
from tao_pipeline.settings.sections import is_valid_cron
from tests.helpers import sample_logs, write_logs


def tao(*args: str, home: Path | None = None):
    env = {"TAO_HOME": str(home)} if home else {}
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- the schedule's cron --------------------------------------------------------------------------


def test_the_cron_check_is_dagsters_own():
    """The settings accept exactly the cron strings Dagster's scheduler accepts (a seeded corpus)."""
    from dagster._utils.schedules import is_valid_cron_string

    atoms = ["*", "0", "59", "60", "1-5", "*/15", "L", "?", "MON", "mon-fri", "JAN", "30", "31", "2", "13", "7",
             "8", "1W", "5#3", "24", "0-23/2", "H", "-1", "FEB"]  # fmt: skip
    rng = random.Random(11)
    corpus = [" ".join(rng.choice(atoms) for _ in range(rng.choice([4, 5, 5, 6]))) for _ in range(5000)]
    corpus += ["@daily", "@weekly", "@reboot", "@annually", "0 0 30 2 *", "0 0 29 2 *", "99 99 99 99 99"]
    disagreements = [cron for cron in corpus if is_valid_cron(cron) != is_valid_cron_string(cron)]
    assert disagreements == []


@pytest.mark.parametrize("cron", ["99 99 99 99 99", "0 0 30 2 *", "* * * * * *", "@reboot", "0 0 1W * *", ""])
def test_a_cron_dagster_would_reject_fails_at_load(cron):
    with pytest.raises(SettingsError, match=r"setting 'flywheel.schedule_cron'"):
        load_settings(None, [f"flywheel.schedule_cron='{cron}'"])


def test_tao_ui_refuses_a_bad_cron_before_starting(tmp_path):
    line = one_line_error(tao("ui", "--set", "flywheel.schedule_cron='99 99 99 99 99'", home=tmp_path))
    assert "flywheel.schedule_cron" in line


# -- scorer options, checked when settings load -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["scoring.scorers.sql={sql_execution=1.0}", "scoring.options.sql_execution={databse='x.duckdb'}"],
         "scoring.options.sql_execution: unknown option 'databse'"),
        (["scoring.scorers.sql={sql_execution=1.0}", "scoring.options.sql_execution={database='/nope.duckdb'}"],
         "scoring.options.sql_execution.database: no DuckDB file at /nope.duckdb"),
        (["scoring.scorers.t={length_limit=1.0}", "scoring.options.length_limit={max_words=-3}"],
         "scoring.options.length_limit"),
        (["scoring.scorers.t={llm_judge=1.0}", "scoring.options.llm_judge={backend='telepathy', model='m'}"],
         "scoring.options.llm_judge.backend"),
        (["scoring.scorers.t={reward_model=1.0}", "scoring.options.reward_model={model='/no/model'}"],
         "scoring.options.reward_model.model"),
    ],
)  # fmt: skip
def test_scorer_options_fail_before_anything_runs(tmp_path, overrides, named):
    settings = load_settings(None, [f"home='{tmp_path}'", *overrides])
    with pytest.raises(ScorerOptionsError, match=named.replace(".", r"\.")):
        check_scorers(settings.scoring, settings.cache_dir)
    args = [item for override in overrides for item in ("--set", override)]
    line = one_line_error(tao("round", *args, home=tmp_path))
    assert named in line
    assert not (tmp_path / "lake").exists()  # nothing was ingested or generated first


def test_the_code_location_and_a_launchpad_run_refuse_bad_scorer_options(tmp_path, monkeypatch):
    bad = ["scoring.scorers.t={length_limit=1.0}", "scoring.options.length_limit={max_wrds=3}"]
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(OVERRIDES_ENV, '["' + '", "'.join(o.replace('"', '\\"') for o in bad) + '"]')
    with pytest.raises(Exception) as refused:
        code_location()  # the code location does not load, and says why
    causes = [refused.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any("unknown option 'max_wrds'" in str(cause) for cause in causes)
    monkeypatch.delenv(OVERRIDES_ENV)
    job = code_location().resolve_job_def("ingest_usage_logs")
    log = write_logs(tmp_path / "logs.jsonl", sample_logs(2))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("log_batches", ["b1"])
        ops = {"usage_logs": {"config": {"path": str(log)}}}
        result = job.execute_in_process(
            instance=instance, partition_key="b1", raise_on_error=False,
            run_config=run_config(SettingsSource(None, tuple(bad)), ops=ops),
        )  # fmt: skip
    assert not result.success
    failure = next(event for event in result.all_events if event.is_failure)
    assert "unknown option 'max_wrds'" in str(failure.event_specific_data.error)
    assert not Lake(tmp_path / "home" / "lake").partitions("usage_logs")  # no step ran


# -- home, models ------------------------------------------------------------------------------------


def test_home_must_be_a_folder_and_not_empty(tmp_path):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(SettingsError, match="is a file, not a folder"):
        load_settings(None, [f"home='{file}'"])
    with pytest.raises(SettingsError, match="home is empty"):
        load_settings(None, ["home=''"])


def test_bootstrap_names_a_missing_or_empty_model_folder(tmp_path):
    line = one_line_error(tao("bootstrap", "--set", f"model.base='{tmp_path / 'missing'}'", home=tmp_path / "h"))
    assert "no such model directory" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(tao("bootstrap", "--set", f"model.base='{tmp_path / 'empty'}'", home=tmp_path / "h"))
    assert "without config.json" in line


def test_a_base_model_that_exists_nowhere_is_never_registered(tmp_path, monkeypatch):
    # No hub here, either way; read by huggingface_hub when it is imported, which an earlier test may have done.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = one_line_error(tao("bootstrap", "--set", "model.base='nobody/no-such-model'", home=tmp_path))
    assert "model.base='nobody/no-such-model' is neither a local model folder nor a model the hub serves" in line
    assert ModelStore(tmp_path / "models").versions().empty


# -- the registry, the lake --------------------------------------------------------------------------

HOLD = """
import sys, time, pathlib, duckdb
con = duckdb.connect(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def test_versions_names_the_champion_and_a_locked_registry(tmp_path, tiny_model_dir):
    store = ModelStore(tmp_path / "models")
    store.champion(load_settings(None, [f"model.base='{tiny_model_dir}'"]).model, log=lambda _: None)
    listed = tao("versions", home=tmp_path)
    assert listed.exit_code == 0 and listed.output.startswith(f"champion: base-{tiny_model_dir.name}")
    held, release = tmp_path / "held", tmp_path / "release"
    shell = subprocess.Popen([sys.executable, "-c", HOLD, str(store.registry_path), str(held), str(release)])
    try:
        while not held.exists():
            time.sleep(0.05)
        started = time.monotonic()
        line = one_line_error(tao("versions", home=tmp_path))
        assert "registry is locked by another process" in line and f"PID {shell.pid}" in line
        assert time.monotonic() - started < 30
    finally:
        release.touch()
        shell.wait(timeout=30)


def test_a_corrupt_lake_file_is_named_by_readers_and_by_doctor(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("usage_logs", "b1", pd.DataFrame({"prompt_id": ["p1"], "log_id": ["l1"]}))
    lake.write("usage_logs", "b2", pd.DataFrame({"prompt_id": ["p2"], "log_id": ["l2"]}))
    broken = lake.path("usage_logs", "b2")
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    with pytest.raises(LakeFileError, match=f"lake file {broken} cannot be read"):
        lake.read("usage_logs", "b2")
    with pytest.raises(LakeFileError, match=f"lake file {broken} cannot be read"):
        lake.query("SELECT count(*) FROM usage_logs")
    result = tao("doctor", home=tmp_path)
    assert result.exit_code == 1 and f"!! lake      {broken} cannot be read" in result.output
    assert f"mv '{broken}' '{broken}.bad'" in result.output and "1 problem(s)" in result.output


def test_doctor_on_a_healthy_home_and_its_fix_for_a_missing_view(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("usage_logs", "b1", pd.DataFrame({"prompt_id": ["p1"], "log_id": ["l1"]}))
    assert tao("doctor", home=tmp_path).output.rstrip().endswith("all good")
    with duckdb.connect(str(lake.catalog_path)) as con:
        con.execute("DROP VIEW usage_logs")
    missing = tao("doctor", home=tmp_path)
    assert missing.exit_code == 1 and "no current view for usage_logs" in missing.output
    fixed = tao("doctor", "--fix", home=tmp_path)
    assert fixed.exit_code == 0 and "recreated the views of usage_logs" in fixed.output
    assert len(lake.query("SELECT * FROM usage_logs")) == 1


def test_doctor_names_a_deleted_checkpoint(tmp_path, tiny_model_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    store = ModelStore(tmp_path / "models")
    store.champion(load_settings(None, [f"model.base='{base}'"]).model, log=lambda _: None)
    shutil.rmtree(base)
    result = tao("doctor", home=tmp_path)
    assert result.exit_code == 1 and "base-base: its checkpoint folder" in result.output
    assert "`tao rollback` first" in result.output


def test_tao_ingest_prints_kept_and_quarantined_per_file(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_logs(inbox / "app.jsonl", [*sample_logs(3), "{not json"])
    result = tao("ingest", "--set", "flywheel.settle_seconds=0", home=tmp_path)
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if "app.jsonl" in line and "|" in line]
    assert row.split("|")[3].strip() == "3" and row.split("|")[4].strip() == "1"
    again = tao("ingest", "--set", "flywheel.settle_seconds=0", home=tmp_path)
    assert "nothing new to ingest" in again.output

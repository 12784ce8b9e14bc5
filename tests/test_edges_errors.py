"""One clear line, never a traceback, second pass: locked, corrupt and missing files, full disks, bad names.

Every `tao` command that meets one of these prints exactly one ``Error:`` line naming the file and the
problem, and exits non-zero; `tao doctor` diagnoses them instead of crashing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from tao_pipeline.cli import commands
from tao_pipeline.cli.commands import main
from tao_pipeline.cli.errors import one_line
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import ModelSettings

HOLD = """
import sys, time, pathlib, duckdb
con = duckdb.connect(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.05)
"""


def checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home with a base model, a tuned champion, a lake with one usage-log partition and a catalog."""
    home = tmp_path / "home"
    monkeypatch.setenv("TAO_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    store = ModelStore(home / "models")
    base = checkpoint(tmp_path / "base-model")
    store.champion(ModelSettings(base=str(base)), log=lambda _: None)
    tuned = checkpoint(store.checkpoint_dir("round-0001-dpo"))
    store.register("round-0001-dpo", tuned, parent_version="base-base-model", round_id="round-0001", method="dpo")
    store.record_promotion("round-0001-dpo", "promote", "test")
    lake = Lake(home / "lake")
    lake.write("usage_logs", "b1", pd.DataFrame({"prompt_id": ["p1"], "log_id": ["l1"], "prompt": ["hi"]}))
    return home


def tao(*args: str) -> str:
    """The command's single Error line (it must fail with one, and never print a traceback)."""
    base = Path.cwd() / "base-model"
    result = CliRunner().invoke(main, [*args, "--set", f"model.base='{base}'"])
    assert "Traceback" not in result.output and "Stack Trace" not in result.output, result.output
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


COMMANDS = [
    ["versions"],
    ["lineage", "round-0001-dpo"],
    ["export", "out"],
    ["promote", "round-0001-dpo", "--reason", "x"],
    ["rollback", "--reason", "x"],
    ["bootstrap"],
]


@pytest.mark.parametrize("damage", ["junk", "truncated", "garbled"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
def test_a_corrupt_registry_is_named_by_every_command(home, damage, command):
    registry = home / "models" / "registry.duckdb"
    original = registry.read_bytes()
    if damage == "junk":
        registry.write_text("not a database")
    elif damage == "truncated":
        registry.write_bytes(original[:5000])
    else:
        registry.write_bytes(original[:12288] + bytes(range(256)) * 64 + original[12288 + 16384 :])
    line = tao(*command)
    assert f"{registry} cannot be opened as a DuckDB database" in line and "restore it from a backup" in line


@pytest.mark.parametrize("command", COMMANDS[:5], ids=lambda command: command[0])
def test_a_registry_held_by_a_read_write_shell_is_named_within_seconds(home, tmp_path, command, monkeypatch):
    monkeypatch.setattr(commands, "COMMAND_LOCK_TIMEOUT_S", 1.0)
    held, release = tmp_path / "held", tmp_path / "release"
    shell = subprocess.Popen([sys.executable, "-c", HOLD, str(home / "models" / "registry.duckdb"), held, release])
    try:
        while not held.exists():
            time.sleep(0.05)
        started = time.monotonic()
        line = tao(*command)
        assert "registry.duckdb stayed locked" in line and f"PID {shell.pid}" in line and "-readonly" in line
        assert time.monotonic() - started < 15
    finally:
        release.touch()
        shell.wait(timeout=30)


def test_doctor_diagnoses_a_corrupt_registry_and_catalog_instead_of_crashing(home):
    (home / "models" / "registry.duckdb").write_text("junk")
    (home / "lake" / "catalog.duckdb").write_text("junk")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "!! registry" in result.output and "!! catalog" in result.output
    assert f"mv '{home / 'lake' / 'catalog.duckdb'}'" in result.output
    assert "ok inbox" in result.output  # the other areas are still examined


def test_a_corrupt_lake_partition_is_named_by_lineage(home):
    partition = home / "lake" / "usage_logs" / "b1.parquet"
    partition.write_bytes(partition.read_bytes()[:40])
    for table in ("tuned_checkpoint", "raw_prompts"):
        Lake(home / "lake").write(table, "round-0001", pd.DataFrame({"round": ["round-0001"], "prompt_id": ["p1"]}))
    assert f"lake file {partition} cannot be read" in tao("lineage", "round-0001-dpo")


@pytest.mark.parametrize("destination", ["afile/sub", "afile/sub/deeper", "afile"])
def test_export_under_a_file_is_refused_in_one_line(home, destination):
    Path("afile").write_text("mine")
    line = tao("export", destination)
    assert "afile" in line and ("a file, not a folder" in line or "is a file" in line)
    assert Path("afile").read_text() == "mine"


def test_a_promote_of_a_version_whose_config_json_is_broken_is_refused(home):
    (home / "models" / "checkpoints" / "round-0001-dpo" / "config.json").write_text("{broken")
    assert "config.json cannot be read" in tao("promote", "round-0001-dpo", "--reason", "x")


def test_a_base_model_folder_with_a_broken_config_is_never_registered(tmp_path, monkeypatch):
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    base = checkpoint(tmp_path / "base")
    for content in ["{broken", "[]", "{}"]:
        (base / "config.json").write_text(content)
        result = CliRunner().invoke(main, ["bootstrap", "--set", f"model.base='{base}'"])
        assert result.exit_code == 1 and "its config.json cannot be read" in result.output, result.output
    assert ModelStore(tmp_path / "home" / "models").versions().empty


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """`tao ingest` into a home on a 300 KiB tmpfs, mounted in a private mount namespace (util-linux's unshare,
    as root or in a user namespace): one line, and the file stays in the inbox to be ingested later."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rows = [json.dumps({"prompt": f"question {i}: " + "words " * 20}) for i in range(5000)]
    (inbox / "big.jsonl").write_text("\n".join(rows) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    tao_cli = Path(sys.executable).parent / "tao"
    script = (
        f"mount -t tmpfs -o size=300k tmpfs {home} && TAO_HOME={home} {tao_cli} ingest "
        f"--set flywheel.inbox='{inbox}' --set flywheel.settle_seconds=0"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "no space left on the device" in line and "run the command again" in line
    assert (inbox / "big.jsonl").exists() and not (inbox / "processed").exists()  # nothing lost, retried later


def test_an_unexpected_error_is_one_line_naming_a_traceback_file():
    try:
        raise KeyError("a bug")
    except KeyError as error:
        line = one_line(error)
    assert line.startswith("unexpected KeyError: 'a bug' (the traceback is in ")
    report = Path(line.split("the traceback is in ")[1].split(";")[0])
    assert "raise KeyError" in report.read_text()
    report.unlink()


@pytest.mark.parametrize(
    "database, table, column, said",
    [
        ("junk", "logs", "id", "cannot be opened as a DuckDB database"),
        ("db", "nope", "id", "cannot read 'nope' ordered by 'id'"),
        ("db", "logs", "nope", "cannot read 'logs' ordered by 'nope'"),
        ("missing", "logs", "id", "does not exist"),
    ],
)
def test_a_table_source_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, database, table, column, said):
    import duckdb

    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    (tmp_path / "junk").write_text("not a database")
    with duckdb.connect(str(tmp_path / "db")) as con:
        con.execute("CREATE TABLE logs (id INTEGER, prompt VARCHAR)")
        con.execute("INSERT INTO logs VALUES (1, 'a prompt')")
    source = f"flywheel.table_source={{database='{tmp_path / database}', table='{table}', order_column='{column}'}}"
    result = CliRunner().invoke(main, ["ingest", "--set", source])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert said in line

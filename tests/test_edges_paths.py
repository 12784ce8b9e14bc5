"""Paths, second pass: the product reads, writes, moves and deletes only where it owns.

Every path read from outside, written, moved or deleted is checked: a real folder or a regular file
with one link, inside the place it belongs, never inside the home's own data; names from files are
plain names. Each test tries the issue's example and its neighbours.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.cli.runner import ingest_new_files
from tao_pipeline.common.safe_files import UnsafePathError, move_into, open_regular_file, plain_name
from tao_pipeline.data.ingest import archive_file, pending_log_files
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.export import MANIFEST
from tao_pipeline.settings import ModelSettings, SettingsError, SettingsSource, load_settings
from tests.helpers import inbox_settings, sample_logs, write_logs

SECRET = "sk-live-0b7e5d1f"


@pytest.fixture
def inbox_home(tmp_path, monkeypatch):
    return inbox_settings(tmp_path, monkeypatch, flywheel="settle_seconds = 0")


def aged(path: Path) -> Path:
    past = time.time() - 60
    os.utime(path, (past, past), follow_symlinks=False)
    return path


def lake_text(settings) -> str:
    return "".join(path.read_bytes().decode("latin-1") for path in settings.lake_dir.rglob("*.parquet"))


def secrets_file(tmp_path: Path) -> Path:
    outside = tmp_path / "secrets.jsonl"
    outside.write_text(json.dumps({"prompt": f"the key is {SECRET}"}) + "\n")
    return aged(outside)


# -- the inbox: only regular files with one link ------------------------------------------------------


def test_a_hard_link_to_a_file_elsewhere_is_never_read(inbox_home, tmp_path):
    settings = inbox_home
    os.link(secrets_file(tmp_path), settings.inbox_dir / "innocent.jsonl")
    legit = aged(write_logs(settings.inbox_dir / "legit.jsonl", sample_logs(2)))
    scan = pending_log_files(settings, Lake(settings.lake_dir))
    assert list(scan.ready.values()) == [legit]
    [(path, why)] = scan.refused
    assert path.name == "innocent.jsonl" and "hard link (2 names" in why
    with dg.instance_for_test() as instance:
        ingest_new_files(instance, settings, SettingsSource(), echo=lambda _: None)
    assert SECRET not in lake_text(settings)  # neither as rows nor in quarantined_rows.raw
    assert (settings.inbox_dir / "innocent.jsonl").exists()  # refused, not moved or deleted


@pytest.mark.parametrize("kind", ["folder", "socket", "fifo", "symlink-to-folder", "dangling-symlink"])
def test_every_entry_that_is_not_a_regular_file_is_refused_without_opening_it(inbox_home, tmp_path, kind):
    entry = inbox_home.inbox_dir / "entry.jsonl"
    if kind == "folder":
        entry.mkdir()
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(entry))
    elif kind == "fifo":
        os.mkfifo(entry)  # opening it would block forever
    elif kind == "symlink-to-folder":
        entry.symlink_to(tmp_path)
    else:
        entry.symlink_to(tmp_path / "nowhere")
    aged(entry)
    scan = pending_log_files(inbox_home, Lake(inbox_home.lake_dir))
    assert scan.ready == {}
    [(path, why)] = scan.refused
    assert path == entry and "only regular files with one link" in why


def test_a_name_that_is_not_utf8_is_refused_and_the_files_after_it_go_on(inbox_home):
    inbox = os.fsencode(inbox_home.inbox_dir)
    with open(inbox + b"/caf\xe9.jsonl", "wb") as handle:
        handle.write(json.dumps({"prompt": "latin-1 named"}).encode() + b"\n")
    write_logs(inbox_home.inbox_dir / "later.jsonl", sample_logs(2))
    result = CliRunner().invoke(main, ["ingest"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "not reading" in result.output and "caf\\xe9.jsonl: its name is not valid UTF-8" in result.output
    assert len(Lake(inbox_home.lake_dir).query("SELECT * FROM usage_logs")) == 2


def test_the_reader_refuses_a_link_or_a_hard_link_swapped_in_after_the_scan(tmp_path):
    target = secrets_file(tmp_path)
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(target)
    os.link(target, hard)
    for path, said in [(link, "symbolic link"), (hard, "hard link")]:
        with pytest.raises(UnsafePathError, match=said):
            open_regular_file(path)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UnsafePathError, match="a FIFO"):
        open_regular_file(fifo)  # never blocks waiting for a writer
    assert time.monotonic() - started < 5


# -- archiving: never through a link ---------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["processed", "failed"])
@pytest.mark.parametrize("replacement", ["symlink", "file"])
def test_a_linked_or_fake_archive_folder_moves_nothing(inbox_home, tmp_path, folder, replacement):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    archive = inbox_home.inbox_dir / folder
    if replacement == "symlink":
        archive.symlink_to(elsewhere)
    else:
        archive.write_text("not a folder")
    content = sample_logs(2) if folder == "processed" else ["\x00 not a log at all"]
    name = "app.jsonl" if folder == "processed" else "bad.parquet"
    path = aged(write_logs(inbox_home.inbox_dir / name, content))
    echoed: list[str] = []
    with dg.instance_for_test() as instance:
        ingest_new_files(instance, inbox_home, SettingsSource(), echo=echoed.append)
    assert list(elsewhere.iterdir()) == []  # nothing was moved to where the link points
    assert path.exists()  # the file stays, ingested (or quarantined) once
    assert any(f"{folder} is" in line and "not" in line for line in echoed), echoed
    again: list[str] = []
    with dg.instance_for_test() as instance:
        assert ingest_new_files(instance, inbox_home, SettingsSource(), echo=again.append) == []  # never twice


def test_moves_go_through_folder_handles_and_never_replace_a_file(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    first = write_logs(inbox / "a.jsonl", sample_logs(1))
    assert move_into(first, "processed", "a.jsonl") == inbox / "processed" / "a.jsonl"
    second = write_logs(inbox / "a.jsonl", sample_logs(2))
    with pytest.raises(FileExistsError):
        move_into(second, "processed", "a.jsonl")
    for bad in ["../a.jsonl", "/etc/passwd", "", ".", "..", "x/y"]:
        with pytest.raises(UnsafePathError):
            move_into(second, "processed", bad)
    moved = archive_file(second, inbox, "processed")  # the same name taken: the content's own name
    assert moved is not None and moved.parent == inbox / "processed" and moved.name != "a.jsonl"
    assert len(list((inbox / "processed").iterdir())) == 2


# -- exports: a manifest names plain entries, or it is not ours ---------------------------------------


def checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.fixture
def export_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TAO_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    base = checkpoint(tmp_path / "base-model")
    ModelStore(home / "models").champion(ModelSettings(base=str(base)), log=lambda _: None)
    return home


@pytest.mark.parametrize(
    "listed",
    [["../victim.txt"], ["{victim}"], ["sub/../../victim.txt"], [".."], [""], [7], ["x\x00y"], "victim.txt", None],
)
def test_a_manifest_naming_anything_but_plain_entries_deletes_nothing(export_home, tmp_path, listed):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    destination = tmp_path / "out"
    destination.mkdir()
    files = [item.format(victim=victim) if isinstance(item, str) else item for item in listed] if listed else listed
    (destination / MANIFEST).write_text(json.dumps({"version_id": "x", "files": files}))
    result = CliRunner().invoke(main, ["export", str(destination), "--set", f"model.base='{tmp_path / 'base-model'}'"])
    assert result.exit_code != 0 and "was not written by `tao export`" in result.output, result.output
    assert victim.read_text() == "precious"


def test_a_genuine_earlier_export_is_still_replaced(export_home, tmp_path):
    args = ["export", str(tmp_path / "out"), "--set", f"model.base='{tmp_path / 'base-model'}'"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, args).exit_code == 0
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["files"] == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["a", "a.b", "..a", "a..", "-x", "é"])
def test_plain_names_are_the_entries_of_one_folder(name):
    assert plain_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/a", "a\\b", "a\x00", None, 3, ["a"]])
def test_anything_else_is_not_a_plain_name(name):
    assert not plain_name(name)


# -- settings: inputs never inside the pipeline's own data ---------------------------------------------


@pytest.mark.parametrize(
    "inbox", ["{home}", "{home}/lake/usage_logs", "{home}/models/checkpoints/v1", "{home}/cache", "{home}/dagster"]
)
def test_an_inbox_inside_the_pipelines_own_data_is_refused_at_load(tmp_path, inbox):
    home = tmp_path / "home"
    with pytest.raises(SettingsError, match="flywheel.inbox .* (is the home folder itself|inside the pipeline's own)"):
        load_settings(None, [f"home='{home}'", f"flywheel.inbox='{inbox.format(home=home)}'"])


def test_inboxes_of_their_own_are_fine(tmp_path):
    home = tmp_path / "home"
    for inbox in [tmp_path / "logs", home / "inbox", home / "inbox" / "app", home / "my-drop"]:
        assert load_settings(None, [f"home='{home}'", f"flywheel.inbox='{inbox}'"]).inbox_dir == inbox.resolve()


def test_a_log_file_inside_the_lake_is_refused_at_load(tmp_path):
    home = tmp_path / "home"
    partition = home / "lake" / "usage_logs" / "b.parquet"
    partition.parent.mkdir(parents=True)
    partition.write_bytes(b"PAR1")
    with pytest.raises(SettingsError, match="data.logs .* inside the pipeline's own data"):
        load_settings(None, [f"home='{home}'", f"data.logs=['{partition}']"])


def test_a_hard_linked_configured_log_file_is_refused(tmp_path):
    original = secrets_file(tmp_path)
    linked = tmp_path / "logs.jsonl"
    os.link(original, linked)
    settings = load_settings(None, [f"home='{tmp_path / 'home'}'", f"data.logs=['{linked}']"])
    scan = pending_log_files(settings, Lake(settings.lake_dir))
    assert scan.ready == {} and "hard link" in scan.refused[0][1]

"""`tao export` and the commands that name a version never destroy what the pipeline did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tao_pipeline.cli.commands import main
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.export import MANIFEST, ExportRefused
from tao_pipeline.settings import ModelSettings


def checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    (path / "training_log.json").write_text("[]")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A TAO home with a base model and one tuned version, round-0001-dpo, as champion; cwd is a work folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("TAO_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    work = tmp_path / "user" / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    store = ModelStore(home / "models")
    base = checkpoint(tmp_path / "base-model")
    model = ModelSettings(base=str(base))
    store.champion(model, log=lambda _: None)
    tuned = checkpoint(store.checkpoint_dir("round-0001-dpo"))
    store.register("round-0001-dpo", tuned, parent_version="base-base-model", round_id="round-0001", method="dpo")
    store.record_promotion("round-0001-dpo", "promote", "test")
    (home / "lake").mkdir(parents=True)
    return home


def tao(*args: str):
    return CliRunner().invoke(main, [*args, "--set", f"model.base='{Path.cwd().parent.parent / 'base-model'}'"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("destination", [".", "~", "/", "..", "~/..", "{home}", "{home}/lake/x", "{home}/models"])
def test_folders_whose_replacement_would_destroy_something_are_refused(home, destination):
    before = snapshot(Path.cwd().parent)
    result = tao("export", destination.format(home=home))
    assert result.exit_code != 0
    assert result.output.startswith("Error: refusing to export into"), result.output
    assert snapshot(Path.cwd().parent) == before  # the user's files, untouched


def test_a_non_empty_folder_it_did_not_write_is_refused_and_left_alone(home):
    other = Path("served")
    other.mkdir()
    (other / "README.md").write_text("someone's")
    result = tao("export", "served")
    assert result.exit_code != 0 and "not written by `tao export`" in result.output
    assert (other / "README.md").read_text() == "someone's" and len(list(other.iterdir())) == 1


def test_an_export_replaces_only_its_own_earlier_files(home):
    assert tao("export", "served").exit_code == 0
    exported = Path("served")
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest == {"version_id": "round-0001-dpo", "files": ["config.json", "model.safetensors", "tokenizer.json"]}
    assert not (exported / "training_log.json").exists()
    again = tao("export", "served", "--version", "base-base-model")
    assert again.exit_code == 0, again.output
    assert json.loads((exported / MANIFEST).read_text())["version_id"] == "base-base-model"
    assert not list(Path(".").glob(".served.*"))  # no staging or previous folder left behind
    (exported / "mine.txt").write_text("added by hand")
    refused = tao("export", "served")
    assert refused.exit_code != 0 and (exported / "mine.txt").read_text() == "added by hand"


def test_empty_and_new_folders_are_fine(home):
    Path("empty").mkdir()
    assert tao("export", "empty").exit_code == 0 and (Path("empty") / "model.safetensors").exists()
    assert tao("export", "new/deep/folder").exit_code == 0 and Path("new/deep/folder/config.json").exists()


def test_a_symlinked_destination_is_refused(home, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    Path("link").symlink_to(tmp_path / "elsewhere")
    result = tao("export", "link")
    assert result.exit_code != 0 and "symbolic link" in result.output


def test_a_deleted_checkpoint_is_named_by_promote_rollback_and_export(home):
    store = ModelStore(home / "models")
    shutil.rmtree(store.checkpoint_dir("round-0001-dpo"))
    for args in (("promote", "round-0001-dpo", "--reason", "x"), ("export", "served")):
        result = tao(*args)
        assert result.exit_code != 0 and "checkpoint folder" in result.output and "is missing" in result.output
        assert "Traceback" not in result.output
    shutil.rmtree(Path.cwd().parent.parent / "base-model")
    result = tao("rollback", "--reason", "x")
    assert result.exit_code != 0 and "base-base-model" in result.output and "is missing" in result.output
    assert store.champion(ModelSettings(base="unused")).version_id == "round-0001-dpo"  # nothing recorded


def test_check_destination_is_usable_on_its_own(tmp_path):
    from tao_pipeline.registry.export import check_destination

    with pytest.raises(ExportRefused):
        check_destination(tmp_path, tmp_path / "home")  # contains the pipeline's home

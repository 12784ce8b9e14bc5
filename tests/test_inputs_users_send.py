"""Inputs users really send: gzip under any name, CR-only line endings, prompts that show nothing,
one id for several prompts."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tao_pipeline.data.ingest import UnreadableLogFile, ingest_file, ingest_to_lake, scan_inbox
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import DataSettings, load_settings

LIMITS = DataSettings()
ROWS = [{"id": f"r{i}", "prompt": f"What is {i} + 1?", "task": "arithmetic"} for i in range(5)]


def jsonl(rows: list[dict], end: bytes = b"\n") -> bytes:
    return b"".join(json.dumps(row).encode() + end for row in rows)


@pytest.mark.parametrize(
    "name, compress",
    [
        ("logs.jsonl.gz", True),
        ("logs.json.gz", True),
        ("logs.jsonl", True),  # gzip under a plain name: recognised by its first bytes
        ("logs.jsonl", False),
    ],
)
def test_gzip_jsonl_under_any_name(tmp_path, name, compress):
    path = tmp_path / name
    data = jsonl(ROWS)
    path.write_bytes(gzip.compress(data) if compress else data)
    batch = ingest_file(path, LIMITS)
    assert batch.rows["external_id"].tolist() == [f"r{i}" for i in range(5)] and batch.quarantine.empty


def test_gzip_csv_parquet_and_json_array(tmp_path):
    csv = tmp_path / "logs.csv.gz"
    csv.write_bytes(gzip.compress(b"id,prompt\r\n1,hello\r\n2,world\r\n"))
    assert ingest_file(csv, LIMITS).rows["prompt"].tolist() == ["hello", "world"]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), plain)
    packed = tmp_path / "logs.parquet.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    batch = ingest_file(packed, LIMITS)
    assert batch.rows["prompt"].tolist() == ["a", "b", "c"] and set(batch.rows["source_file"]) == {str(packed)}
    array = tmp_path / "logs.json.gz"
    array.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert len(ingest_file(array, LIMITS).rows) == 5


def test_a_corrupt_gzip_file_is_unreadable_as_a_whole_and_named(tmp_path):
    path = tmp_path / "logs.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(ROWS))[:-20])  # cut short
    with pytest.raises(UnreadableLogFile, match="logs.jsonl.gz: not a readable gzip file"):
        ingest_to_lake(path, LIMITS, Lake(tmp_path / "lake"), "b1")
    assert not list((tmp_path / "lake").rglob("*.parquet"))  # nothing half-written


@pytest.mark.parametrize("end", [b"\r", b"\r\n", b"\n"])
def test_every_line_ending_splits_lines(tmp_path, end):
    path = tmp_path / "logs.jsonl"
    path.write_bytes(jsonl(ROWS, end))
    batch = ingest_file(path, LIMITS)
    assert batch.rows["line_number"].tolist() == [1, 2, 3, 4, 5] and batch.quarantine.empty


@pytest.mark.parametrize(
    "prompt", ["\u200b", "\ufeff\u200d", "\x00", "\x00\x01\x7f", " \u2060 \u202e ", "\u200b\n\u200c"]
)
def test_a_prompt_that_shows_nothing_is_quarantined(tmp_path, prompt):
    path = tmp_path / "logs.jsonl"
    path.write_bytes(jsonl([{"prompt": prompt}, {"prompt": "\u200bWhat is 2 + 2?\u200b"}]))
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine["reason"].tolist() == [
        "prompt is empty once invisible characters are removed (zero-width, BOM, control)"
    ]
    assert len(batch.rows) == 1  # visible text around zero-width characters is a prompt


def test_one_id_for_several_prompts_is_counted(tmp_path):
    rows = [
        {"id": "same", "prompt": "first"},
        {"id": "same", "prompt": "second"},
        {"id": "twice", "prompt": "third"},
        {"id": "twice", "prompt": "third"},  # the same prompt logged twice: no conflict
        {"prompt": "no id"},
    ]
    path = tmp_path / "logs.jsonl"
    path.write_bytes(jsonl(rows))
    summary = ingest_to_lake(path, LIMITS, Lake(tmp_path / "lake"), "b1")
    assert (summary.rows, summary.distinct_prompts, summary.conflicting_ids) == (5, 4, 1)


def test_gzip_names_are_log_files_in_the_inbox(tmp_path, monkeypatch):
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[flywheel]\nsettle_seconds = 0\n')
    settings = load_settings(config)
    settings.inbox_dir.mkdir(parents=True)
    for name in ("a.jsonl.gz", "b.csv.gz", "c.parquet.gz", "d.json.gz", "e.log.gz"):
        (settings.inbox_dir / name).write_bytes(gzip.compress(name.encode()))
    ready = sorted(path.name for path in scan_inbox(settings, set()).ready.values())
    assert ready == ["a.jsonl.gz", "b.csv.gz", "c.parquet.gz", "d.json.gz"]

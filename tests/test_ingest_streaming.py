"""Streaming ingestion into the lake: chunked, atomic, bounded in memory; JSON arrays and float ids.

``ingest_file`` (whole file in memory) and ``ingest_to_lake`` (the pipeline's streaming path)
read the same chunks; these tests hold the streaming path to the same rows, check that a file
that turns out unreadable halfway leaves no trace in the lake, and that memory does not grow
with the file.
"""

from __future__ import annotations

import codecs
import json
import tracemalloc

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tao_pipeline.data.ingest import (
    QUARANTINE_COLUMNS,
    QUARANTINE_TABLE,
    USAGE_LOG_COLUMNS,
    USAGE_TABLE,
    UnreadableLogFile,
    batch_key,
    ingest_file,
    ingest_to_lake,
    read_log_chunks,
)
from tao_pipeline.data.ingest import readers as ingest_readers
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.resources import build_resources
from tao_pipeline.settings import DataSettings
from tests.helpers import inbox_settings, ingest_assets

LIMITS = DataSettings(max_prompt_chars=200)


def mixed_lines(count: int) -> list[bytes]:
    """Good rows of a few tasks and repeated prompts, with a malformed line every 10th and an empty prompt every 7th."""
    lines = []
    for i in range(1, count + 1):
        if i % 10 == 0:
            lines.append(b'{"prompt": "truncated')
        elif i % 7 == 0:
            lines.append(json.dumps({"id": i, "prompt": "  "}).encode())
        else:
            lines.append(json.dumps({"id": i, "prompt": f"What is {i % 50} + 1?", "task": f"t{i % 3}"}).encode())
    return lines


def write_jsonl(path, count: int):
    path.write_bytes(b"".join(line + b"\n" for line in mixed_lines(count)))
    return path


def lake_frames(lake: Lake, batch: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return lake.read(USAGE_TABLE, batch), lake.read(QUARANTINE_TABLE, batch)


def without_time(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["received_at"]).reset_index(drop=True)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_streaming_into_the_lake_writes_the_rows_ingest_file_reads(tmp_path, fmt):
    source = write_jsonl(tmp_path / "logs.jsonl", 95)
    if fmt != "jsonl":
        records = [json.loads(line) for line in source.read_bytes().splitlines() if not line.endswith(b"truncated")]
        frame = pd.DataFrame(records)
        source = tmp_path / f"logs.{fmt}"
        frame.to_csv(source, index=False) if fmt == "csv" else frame.to_parquet(source, row_group_size=16)
    lake = Lake(tmp_path / "lake")
    summary = ingest_to_lake(source, LIMITS, lake, "b-1", chunk_rows=7)
    rows, quarantine = lake_frames(lake, "b-1")
    whole = ingest_file(source, LIMITS)
    assert list(rows.columns) == [*USAGE_LOG_COLUMNS, "batch"] and set(rows["batch"]) <= {"b-1"}
    assert list(quarantine.columns) == [*QUARANTINE_COLUMNS, "batch"]
    pd.testing.assert_frame_equal(without_time(rows.drop(columns="batch")), without_time(whole.rows))
    pd.testing.assert_frame_equal(quarantine.drop(columns="batch"), whole.quarantine)
    assert rows["received_at"].nunique() == 1
    assert (summary.rows, summary.quarantined) == (len(rows), len(quarantine)) and len(quarantine) > 0
    assert summary.distinct_prompts == rows["prompt_id"].nunique() < len(rows)  # repeated prompts counted once
    assert summary.per_task().set_index("task")["rows"].to_dict() == rows["task"].value_counts().to_dict()
    assert summary.quarantine_reasons()["line_number"].tolist() == quarantine["line_number"].head(20).tolist()
    assert pq.ParquetFile(lake.path(USAGE_TABLE, "b-1")).metadata.num_row_groups > 1  # written chunk by chunk
    assert lake.query(f"SELECT count(*) AS n FROM {USAGE_TABLE}")["n"].iloc[0] == len(rows)  # the catalog view
    assert not list((tmp_path / "lake").rglob("*.tmp"))


def test_chunks_never_exceed_the_chunk_size_and_cover_every_line(tmp_path):
    path = write_jsonl(tmp_path / "logs.jsonl", 101)
    chunks = list(read_log_chunks(path, LIMITS, chunk_rows=10))
    assert len(chunks) == 11
    assert all(chunk.rows.num_rows + chunk.quarantine.num_rows <= 10 for chunk in chunks)
    numbers = [
        n for chunk in chunks for part in (chunk.rows, chunk.quarantine) for n in part["line_number"].to_pylist()
    ]
    assert sorted(numbers) == list(range(1, 102))


def test_an_empty_file_gives_empty_typed_partitions(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    lake = Lake(tmp_path / "lake")
    summary = ingest_to_lake(path, LIMITS, lake, "empty-1")
    rows, quarantine = lake_frames(lake, "empty-1")
    assert rows.empty and quarantine.empty and summary.rows == summary.distinct_prompts == 0
    assert pq.read_schema(lake.path(USAGE_TABLE, "empty-1")).field("line_number").type == pa.int64()


def corrupt_parquet_halfway(path) -> None:
    """Three row groups of 10,000 rows; the last one's first data page overwritten (the footer stays intact)."""
    prompts = [f"prompt number {i} " + "x" * (i % 40) for i in range(30_000)]
    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=10_000, compression="snappy")
    offset = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset + 50 : offset + 250] = b"\xff" * 200
    path.write_bytes(bytes(data))


def test_a_file_unreadable_halfway_leaves_the_lake_as_it_was(tmp_path):
    path = tmp_path / "corrupt.parquet"
    corrupt_parquet_halfway(path)
    lake = Lake(tmp_path / "lake")
    seen = []
    with pytest.raises(UnreadableLogFile, match="not a readable Parquet file"):
        for chunk in read_log_chunks(path, LIMITS, chunk_rows=500):
            seen.append(chunk.rows.num_rows)
    assert sum(seen) >= 20_000  # the first two row groups were read before the corrupt page
    with pytest.raises(UnreadableLogFile, match="not a readable Parquet file"):
        ingest_to_lake(path, LIMITS, lake, "corrupt-1", chunk_rows=500)
    assert not lake.exists(USAGE_TABLE, "corrupt-1") and not lake.exists(QUARANTINE_TABLE, "corrupt-1")
    assert not [p for p in (tmp_path / "lake").rglob("*") if p.is_file() and p.suffix == ".tmp"]


def test_memory_does_not_grow_with_the_file(tmp_path):
    """Python's peak allocation while streaming 75,000 rows stays near that of 25,000 rows (both files over
    the 1 MiB hashing block; whole files in memory would be 3 times)."""
    peaks = {}
    for count in (25_000, 75_000):
        path = write_jsonl(tmp_path / f"logs-{count}.jsonl", count)
        tracemalloc.start()
        try:
            ingest_to_lake(path, LIMITS, Lake(tmp_path / "lake"), f"b-{count}", chunk_rows=2_000)
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[75_000] < 1.2 * peaks[25_000], peaks


# -- JSON arrays --------------------------------------------------------------------------------


def test_a_json_file_holding_one_array_is_read_element_by_element(tmp_path):
    path = tmp_path / "export.json"
    records = [
        {"id": "a", "prompt": "first", "task": "arithmetic"},
        {"prompt": ""},
        ["not", "an", "object"],
        {"id": 4, "prompt": "fourth", "constraints": {"max_words": 3}},
        {"prompt": "x" * 201},
    ]
    path.write_bytes(codecs.BOM_UTF8 + b"\n  " + json.dumps(records, indent=2).encode() + b"\n")
    batch = ingest_file(path, LIMITS)
    assert batch.rows[["external_id", "prompt", "task", "line_number"]].values.tolist() == [
        ["a", "first", "arithmetic", 1],
        ["4", "fourth", "general", 4],
    ]
    assert batch.rows["constraints"].iloc[1] == '{"max_words": 3}'
    reasons = dict(zip(batch.quarantine["line_number"], batch.quarantine["reason"]))
    assert reasons == {
        2: "prompt is empty",
        3: "row must be a JSON object, got list",
        5: "prompt too long: 201 chars > data.max_prompt_chars=200",
    }
    assert batch.quarantine.set_index("line_number").loc[3, "raw"] == '["not", "an", "object"]'


def test_an_empty_json_array_has_no_rows_and_is_not_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_bytes(b"[]")
    batch = ingest_file(path, LIMITS)
    assert batch.rows.empty and batch.quarantine.empty


def test_jsonl_saved_as_json_is_still_read_line_by_line(tmp_path):
    path = tmp_path / "logs.json"
    path.write_bytes(b'{"prompt": "one"}\n["a list line"]\n{"prompt": "three"}\n')
    batch = ingest_file(path, LIMITS)
    assert batch.rows[["prompt", "line_number"]].values.tolist() == [["one", 1], ["three", 3]]
    assert batch.quarantine["reason"].tolist() == ["row must be a JSON object, got list"]


def test_a_broken_json_array_is_read_line_by_line_so_nothing_is_lost(tmp_path):
    path = tmp_path / "cut.json"
    path.write_bytes(b'[\n{"prompt": "one"},\n{"prompt": "two"},\n{"prompt": "thr')
    batch = ingest_file(path, LIMITS)
    assert batch.rows.empty
    assert batch.quarantine["line_number"].tolist() == [1, 2, 3, 4]
    assert all(reason.startswith("not valid JSON") for reason in batch.quarantine["reason"])


def test_a_json_array_over_the_size_limit_is_refused_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_readers, "MAX_JSON_ARRAY_BYTES", 1024)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"prompt": f"prompt {i}"} for i in range(100)]))
    with pytest.raises(UnreadableLogFile, match=r"JSON array file is read whole .* write it as JSONL"):
        ingest_file(path, LIMITS)
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"prompt": "fits"}]))
    assert ingest_file(small, LIMITS).rows["prompt"].tolist() == ["fits"]


# -- Parquet ids stored as floats ---------------------------------------------------------------


def test_parquet_ids_stored_as_whole_floats_are_ids(tmp_path):
    path = tmp_path / "pandas.parquet"
    pd.DataFrame({"id": [1, None, 3], "prompt": ["a", "b", "c"]}).to_parquet(path)  # pandas makes the ids float64
    assert pq.read_schema(path).field("id").type == pa.float64()
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine.empty
    assert batch.rows["external_id"].tolist()[::2] == ["1", "3"]
    assert len(batch.rows["external_id"].iloc[1]) == 16  # a null id: a generated one


def test_parquet_ids_that_are_nan_or_fractions_are_quarantined(tmp_path):
    path = tmp_path / "floats.parquet"
    ids = [2.0, float("nan"), 2.5, float("inf"), -0.0, 1e20]
    pq.write_table(pa.table({"id": pa.array(ids, pa.float64()), "prompt": list("abcdef")}), path)
    batch = ingest_file(path, LIMITS)
    assert batch.rows[["external_id", "prompt"]].values.tolist() == [
        ["2", "a"],
        ["0", "e"],
        ["100000000000000000000", "f"],
    ]
    assert batch.quarantine[["line_number", "reason"]].values.tolist() == [
        [2, "field 'id' must be a string or integer, got float nan"],
        [3, "field 'id' must be a string or integer, got float 2.5"],
        [4, "field 'id' must be a string or integer, got float inf"],
    ]


# -- through the usage_logs asset ---------------------------------------------------------------


@pytest.fixture
def ingest_home(tmp_path, monkeypatch):
    settings = inbox_settings(tmp_path, monkeypatch, data="max_prompt_chars = 200")
    with dg.instance_for_test() as instance:
        yield settings, instance


def materialize(instance, path) -> tuple[str, dg.ExecuteInProcessResult]:
    key = batch_key(path)
    instance.add_dynamic_partitions("log_batches", [key])
    result = dg.materialize(
        ingest_assets(),
        partition_key=key,
        instance=instance,
        resources=build_resources(),
        run_config={"ops": {"usage_logs": {"config": {"path": str(path)}}}},
    )
    return key, result


def test_the_asset_streams_a_json_array_into_the_lake_and_archives_it(ingest_home):
    settings, instance = ingest_home
    path = settings.inbox_dir / "export.json"
    path.write_text(
        json.dumps([{"prompt": "one", "task": "a"}, {"prompt": "two", "task": "b"}, {"prompt": "one"}, {"task": "a"}])
    )
    key, result = materialize(instance, path)
    assert result.success
    metadata = result.asset_materializations_for_node("usage_logs")[0].metadata
    assert (metadata["rows"].value, metadata["distinct_prompts"].value, metadata["quarantined"].value) == (3, 2, 1)
    assert "missing required field 'prompt'" in metadata["quarantine_reasons"].value
    rows = Lake(settings.lake_dir).read(USAGE_TABLE, key)
    assert rows["prompt"].tolist() == ["one", "two", "one"] and set(rows["batch"]) == {key}
    assert (settings.inbox_dir / "processed" / "export.json").exists()


def test_the_asset_reports_a_file_unreadable_halfway_once(ingest_home):
    settings, instance = ingest_home
    path = settings.inbox_dir / "corrupt.parquet"
    corrupt_parquet_halfway(path)
    key, result = materialize(instance, path)
    assert result.success
    lake = Lake(settings.lake_dir)
    assert lake.read(USAGE_TABLE, key).empty  # committed with no rows: the same file is never read again
    [reason] = lake.read(QUARANTINE_TABLE, key)["reason"]
    assert "not a readable Parquet file" in reason
    assert (settings.inbox_dir / "failed" / "corrupt.parquet").exists()

"""tao_pipeline.lake: atomic Parquet partitions and the DuckDB catalog of views."""

from __future__ import annotations

import pandas as pd
import pytest

from tao_pipeline.data import lake as lake_module
from tao_pipeline.data.lake import CATALOG_FILE, Lake


def frame(round_id: str, count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"{round_id}-p{i}" for i in range(count)],
            "score": [i / 10 for i in range(count)],
            "log_ids": [[f"log-{i}", f"log-{i}b"] for i in range(count)],
            "system": [None if i % 2 else "Be brief." for i in range(count)],
        }
    )


def test_write_read_roundtrip(tmp_path):
    lake = Lake(tmp_path / "lake")
    original = frame("r1", 4)
    path = lake.write("scores", "r1", original)
    assert path == tmp_path / "lake" / "scores" / "r1.parquet"
    assert path.is_file()
    assert lake.exists("scores", "r1")
    assert not lake.exists("scores", "r2")
    back = lake.read("scores", "r1")
    assert list(back.columns) == list(original.columns)
    assert back["prompt_id"].tolist() == original["prompt_id"].tolist()
    assert back["score"].tolist() == original["score"].tolist()
    assert [list(ids) for ids in back["log_ids"]] == original["log_ids"].tolist()
    assert back["system"].tolist() == original["system"].tolist()


def test_rewrite_replaces_the_partition(tmp_path):
    lake = Lake(tmp_path)
    lake.write("scores", "r1", frame("old", 5))
    lake.write("scores", "r1", frame("new", 2))
    assert lake.read("scores", "r1")["prompt_id"].tolist() == ["new-p0", "new-p1"]
    assert lake.query('SELECT count(*) AS n FROM "scores"')["n"].iloc[0] == 2


def test_partitions(tmp_path):
    lake = Lake(tmp_path)
    assert lake.partitions("scores") == []
    for round_id in ("round-0002", "round-0001", "round-0010"):
        lake.write("scores", round_id, frame(round_id, 1))
    lake.write("pairs", "round-0001", frame("x", 1))
    assert lake.partitions("scores") == ["round-0001", "round-0002", "round-0010"]
    assert lake.partitions("pairs") == ["round-0001"]


def test_catalog_view_spans_partitions(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("scores", "r1", frame("r1", 3).assign(round="r1"))
    lake.write("scores", "r2", frame("r2", 2).assign(round="r2", extra="only in r2"))  # schemas may grow
    assert (tmp_path / "lake" / CATALOG_FILE).is_file()
    counts = lake.query('SELECT round, count(*) AS n FROM "scores" GROUP BY round ORDER BY round')
    assert counts.to_dict("list") == {"round": ["r1", "r2"], "n": [3, 2]}
    extra = lake.query('SELECT count(extra) AS n FROM "scores"')
    assert extra["n"].iloc[0] == 2
    # A second Lake object on the same folder (another process) sees the same catalog.
    total = Lake(tmp_path / "lake").query('SELECT sum(score) AS s FROM "scores"')["s"].iloc[0]
    assert total == pytest.approx(0.0 + 0.1 + 0.2 + 0.0 + 0.1)


def test_views_join_across_tables(tmp_path):
    lake = Lake(tmp_path)
    lake.write("prompts", "r1", pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["A?", "B?"]}))
    lake.write("scores", "r1", pd.DataFrame({"prompt_id": ["a", "a", "b"], "score": [1.0, 0.5, 0.25]}))
    joined = lake.query(
        'SELECT p.prompt, max(s.score) AS best FROM "prompts" p JOIN "scores" s USING (prompt_id) '
        "GROUP BY p.prompt ORDER BY p.prompt"
    )
    assert joined.to_dict("list") == {"prompt": ["A?", "B?"], "best": [1.0, 0.25]}


def test_query_is_read_only(tmp_path):
    lake = Lake(tmp_path)
    lake.write("scores", "r1", frame("r1", 1))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; DuckDB's error type is not the point
        lake.query("CREATE TABLE sneaky AS SELECT 1")


def test_query_on_an_empty_lake(tmp_path):
    lake = Lake(tmp_path / "fresh")
    assert lake.query("SELECT 42 AS answer")["answer"].iloc[0] == 42


def test_no_temp_files_left_behind(tmp_path):
    lake = Lake(tmp_path)
    for i in range(3):
        lake.write("scores", f"r{i}", frame(f"r{i}", 2))
    lake.write("scores", "r0", frame("again", 2))
    files = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert files == ["r0.parquet", "r1.parquet", "r2.parquet"]


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_partition(tmp_path, monkeypatch):
    lake = Lake(tmp_path)
    lake.write("scores", "r1", frame("good", 2))
    real_write = lake_module.pq.write_table

    def write_then_fail(table, where, *args, **kwargs):  # fault injection: the disk fills up mid-write
        real_write(table, where, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(lake_module.pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        lake.write("scores", "r1", frame("bad", 3))
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["r1.parquet"]
    assert lake.read("scores", "r1")["prompt_id"].tolist() == ["good-p0", "good-p1"]


def test_read_of_a_missing_partition_names_the_table(tmp_path):
    lake = Lake(tmp_path)
    with pytest.raises(FileNotFoundError, match="'raw_prompts'") as info:
        lake.read("raw_prompts", "round-0001")
    assert "round-0001" in str(info.value)
    lake.write("raw_prompts", "round-0001", frame("r", 1))
    with pytest.raises(FileNotFoundError, match="'raw_prompts'"):
        lake.read("raw_prompts", "round-0002")

"""plan_ingest_runs: which ready log files the usage-log sensor puts in which ingest run."""

from pathlib import Path

import pytest

from tao_pipeline.data.ingest import plan_ingest_runs


def ready(*keys: str) -> dict[str, Path]:
    return {key: Path(f"/inbox/{key}.jsonl") for key in keys}


def test_new_files_go_in_key_order_in_runs_of_at_most_max_files():
    plan = plan_ingest_runs([], ready("c", "a", "e", "b", "d"), set(), max_files=2, max_runs=5)
    assert plan == [["a", "b"], ["c", "d"], ["e"]]


def test_no_more_runs_than_free_slots_and_none_without_one():
    assert plan_ingest_runs([], ready("a", "b", "c"), set(), max_files=1, max_runs=2) == [["a"], ["b"]]
    assert plan_ingest_runs([], ready("a"), set(), max_files=64, max_runs=0) == []
    assert plan_ingest_runs([], ready("a"), set(), max_files=64, max_runs=-1) == []  # more in flight than allowed


def test_a_file_in_a_run_in_flight_waits():
    assert plan_ingest_runs(["a"], ready("a", "b"), {"a"}, max_files=64, max_runs=2) == [["b"]]
    assert plan_ingest_runs(["a", "b"], ready("a", "b"), {"a", "b"}, max_files=64, max_runs=2) == []


def test_runs_cover_only_consecutive_partitions_in_the_order_they_were_added():
    """'z' was added before 'b': a range from 'z' to 'b' is what the instance holds, whatever the names; a
    committed partition ('m') between two that failed splits them, as a range over it would redo it."""
    known = ["z", "m", "b"]
    assert plan_ingest_runs(known, ready("z", "b", "n"), set(), max_files=64, max_runs=3) == [["z"], ["b", "n"]]
    assert plan_ingest_runs(known, ready("z", "m", "b"), {"m"}, max_files=64, max_runs=3) == [["z"], ["b"]]


@pytest.mark.parametrize("max_files", [1, 2, 3, 64])
def test_every_ready_file_not_in_flight_is_planned_once(max_files):
    known = [f"k{i}" for i in range(10)]
    files = ready("k1", "k2", "k5", "k9", "n1", "n2", "n3")
    plan = plan_ingest_runs(known, files, {"k2"}, max_files=max_files, max_runs=100)
    planned = [key for run in plan for key in run]
    assert sorted(planned) == ["k1", "k5", "k9", "n1", "n2", "n3"] and len(planned) == len(set(planned))
    assert all(1 <= len(run) <= max_files for run in plan)
    order = known + ["n1", "n2", "n3"]
    assert all(order.index(b) - order.index(a) == 1 for run in plan for a, b in zip(run, run[1:]))

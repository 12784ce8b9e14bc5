"""Limits, second pass: one hostile input never stalls the rest.

A line, a field, a prompt: each has a limit checked before the work, the row quarantined with its
reason, in time linear in the input's size, and the rows after it go on.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from pathlib import Path

import pytest

from tao_pipeline.data.ingest import read_records
from tao_pipeline.data.ingest.readers import _lines
from tao_pipeline.data.ingest.validation import MAX_CONSTRAINTS_CHARS, MAX_ID_CHARS, MAX_TASK_CHARS, LogRow
from tao_pipeline.settings import DataSettings, SettingsError, load_settings

LIMITS = DataSettings(max_line_bytes=64 * 1024)


def records(path: Path, limits: DataSettings = LIMITS) -> list:
    return list(read_records(path, limits))


def kept(items) -> list[str]:
    return [item.prompt for item in items if isinstance(item, LogRow)]


def reasons(items) -> dict[int, str]:
    return {item["line_number"]: item["reason"] for item in items if not isinstance(item, LogRow)}


def huge_line_file(path: Path, size: int, end: bytes = b"\n", compress: bool = False) -> Path:
    body = b'{"prompt": "before"}' + end + b'{"prompt": "' + b"a" * size + b'"}' + end + b'{"prompt": "after"}' + end
    path.write_bytes(gzip.compress(body) if compress else body)
    return path


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("compress", [False, True])
def test_a_line_over_the_limit_is_quarantined_and_the_next_lines_go_on(tmp_path, end, compress):
    path = huge_line_file(tmp_path / "logs.jsonl", 200_000, end, compress)
    items = records(path)
    assert kept(items) == ["before", "after"]
    assert reasons(items) == {2: "line too long: 200014 bytes > data.max_line_bytes=65536 (skipped unparsed)"}
    [bad] = [item for item in items if not isinstance(item, LogRow)]
    assert bad["raw"].startswith('{"prompt": "aaa') and len(bad["raw"]) <= 500  # a preview, not the line


def test_one_huge_line_in_a_small_gzip_is_read_in_linear_time(tmp_path):
    """The reader was quadratic in a line's length (10 MB 12.5 s, 20 MB 50 s, 40 MB 193 s)."""
    path = huge_line_file(tmp_path / "bomb.jsonl.gz", 40 * 2**20, compress=True)
    assert path.stat().st_size < 100_000
    started = time.process_time()
    items = records(path, DataSettings())  # the default limit, 4 MiB
    assert time.process_time() - started < 10  # ~0.5 s here; the quadratic reader took minutes
    assert kept(items) == ["before", "after"] and "line too long: 41943054 bytes" in reasons(items)[2]


def test_line_breaks_are_found_across_read_blocks(tmp_path):
    """Lines split between blocks (a \\r\\n cut in two, empty lines, a last line with no end) read as whole."""
    text = b"a\r\nbb\r\rccc\n\nd\re"
    for block in range(1, len(text) + 2):
        assert list(_lines(io.BytesIO(text), 1024, block=block)) == [b"a", b"bb", b"", b"ccc", b"", b"d", b"e"], block


def test_a_line_exactly_at_the_limit_is_read_and_one_byte_more_is_not(tmp_path):
    line = json.dumps({"prompt": "y" * (1024 - 14)}).encode()
    assert len(line) == 1024
    path = tmp_path / "edge.jsonl"
    path.write_bytes(line + b"\n" + line[:-2] + b'y"}\n')
    items = records(path, DataSettings(max_line_bytes=1024))
    assert len(kept(items)) == 1 and reasons(items)[2].startswith("line too long: 1025 bytes")


def test_a_csv_line_over_the_limit_is_quarantined_and_later_rows_go_on(tmp_path):
    path = tmp_path / "logs.csv"
    path.write_bytes(b"prompt,task\nbefore,x\n" + b"b" * 300_000 + b",x\nafter,x\n")
    items = records(path)
    assert kept(items) == ["before", "after"]
    assert reasons(items)[2].startswith("line too long: 300003 characters")


def test_a_csv_quote_that_swallows_a_huge_line_quarantines_only_its_first_line(tmp_path):
    path = tmp_path / "logs.csv"
    path.write_bytes(b'prompt,task\n"unclosed,x\n' + b"c" * 300_000 + b",x\nafter,x\n")
    items = records(path)
    assert kept(items) == ["after"]
    assert len(reasons(items)) == 2  # the line with the stray quote, and the huge line on its own


FIELD_LIMITS = [
    ({"prompt": "hi", "system": "s" * 40_000}, "system message too long: 40000 chars > data.max_system_chars"),
    ({"prompt": "hi", "id": "i" * (MAX_ID_CHARS + 1)}, f"field 'id' too long: {MAX_ID_CHARS + 1} chars"),
    ({"prompt": "hi", "task": "t" * (MAX_TASK_CHARS + 1)}, f"field 'task' too long: {MAX_TASK_CHARS + 1} chars"),
    ({"prompt": "p" * 9000}, "prompt too long: 9000 chars > data.max_prompt_chars=8000"),
]


@pytest.mark.parametrize("row, reason", FIELD_LIMITS)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_every_field_has_a_limit_in_every_format(tmp_path, row, reason, suffix):
    import pandas as pd

    path = tmp_path / f"logs{suffix}"
    frame = pd.DataFrame([row, {"prompt": "fine"}])
    if suffix == ".jsonl":
        path.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "fine"}) + "\n")
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    items = records(path, DataSettings(max_line_bytes=2**20))
    assert kept(items) == ["fine"]
    assert reasons(items)[1].startswith(reason)


def test_constraints_have_a_limit(tmp_path):
    path = tmp_path / "logs.jsonl"
    row = {"prompt": "hi", "constraints": {"k": "v" * MAX_CONSTRAINTS_CHARS}}
    path.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "fine", "constraints": {"max_words": 5}}) + "\n")
    items = records(path, DataSettings(max_line_bytes=2**20))
    assert kept(items) == ["fine"] and reasons(items)[1].startswith("field 'constraints' too long")


@pytest.mark.parametrize("value", ["1023", "2147483648", "-1"])
def test_the_line_limit_has_a_sane_range(value):
    with pytest.raises(SettingsError, match="data.max_line_bytes"):
        load_settings(None, [f"data.max_line_bytes={value}"])

"""Property-based tests (hypothesis) of usage-log ingestion: hostile files never crash a run.

Generated JSONL, CSV and Parquet files mix known-good rows with bad ones of every kind (random
bytes, invalid UTF-8, deep nesting, wrong types, missing or empty prompts, over-long prompts,
stray quotes, wrong field counts, corrupt files). The properties:

* ``ingest_file`` never raises, except ``UnreadableLogFile`` for a file that is not of its
  format at all (the documented report path);
* every good row is kept exactly once, with its fields, at its line (row) number;
* every bad line is quarantined exactly once with a non-empty reason naming the problem;
* both frames can be written to the lake (Arrow/Parquet), like the ingestion asset does.

How many cases each property tries is the hypothesis profile's (tests/conftest.py): a small
sample on every run, each property's full size (below, 3,600 cases in all) under ``TAO_FUZZ=full``
(``make test-full``); ``TAO_FUZZ_SCALE=10`` multiplies either. The inputs that found bugs are kept
as ``@example``s, so they run every time whatever the profile. The run ends with the number of cases
tried ("hypothesis: N cases ran").
"""

from __future__ import annotations

import codecs
import datetime
import io
import json
import math
import re
import tempfile
import tracemalloc
import unicodedata
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tao_pipeline.data.ingest import QUARANTINE_COLUMNS, USAGE_LOG_COLUMNS, UnreadableLogFile, ingest_file
from tao_pipeline.data.prompts import DEFAULT_TASK, prompt_id_for
from tao_pipeline.settings import DataSettings
from tests.helpers import FUZZ_CASES, fuzz_examples

MAX_CHARS = 200
LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # where a JSONL line ends
LIMITS = DataSettings(max_prompt_chars=MAX_CHARS, min_prompt_chars=1)
CASES: Counter[str] = Counter()


def fuzz(full: int):
    """A property's settings: ``full`` cases under TAO_FUZZ=full, the profile's smaller count otherwise."""
    return settings(max_examples=fuzz_examples(full))


@pytest.fixture(autouse=True)
def count_cases(request):
    """The cases each test tried, for the run's summary line (tests/conftest.py adds them up, across workers)."""
    before = CASES.copy()
    yield
    for kind, count in (CASES - before).items():
        request.node.user_properties.append((FUZZ_CASES, (kind, count)))


def ingest(suffix: str, data: bytes):
    """Write ``data`` to a fresh file and ingest it; returns (path, batch)."""
    folder = Path(tempfile.mkdtemp(prefix="ingest-fuzz-"))
    path = folder / f"logs{suffix}"
    path.write_bytes(data)
    try:
        return path, ingest_file(path, LIMITS)
    finally:
        path.unlink()
        folder.rmdir()


def assert_lake_writable(batch) -> None:
    """The asset writes both frames to Parquet: no surrogates, no unserialisable objects."""
    assert list(batch.rows.columns) == USAGE_LOG_COLUMNS
    assert list(batch.quarantine.columns) == QUARANTINE_COLUMNS
    for frame in (batch.rows, batch.quarantine):
        pq.write_table(pa.Table.from_pandas(frame.assign(batch="b"), preserve_index=False), io.BytesIO())
    assert batch.rows["log_id"].is_unique
    assert all(isinstance(r, str) and r for r in batch.quarantine["reason"])
    assert all(len(raw) <= 500 for raw in batch.quarantine["raw"])


# -- shared strategies --------------------------------------------------------------------------

UNICODE = st.characters(exclude_categories=("Cs",))  # any code point but lone surrogates
SPACES = st.sampled_from([c for c in map(chr, range(0x3001)) if c.isspace()])


def texts(min_size: int = 0, max_size: int = 30) -> st.SearchStrategy[str]:
    return st.text(UNICODE, min_size=min_size, max_size=max_size)


INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zs", "Zl", "Zp"}  # control, format (zero-width, BOM), separators


def shows_something(text: str) -> bool:
    """The spec of a non-empty prompt: at least one character that is not invisible."""
    return any(unicodedata.category(char) not in INVISIBLE_CATEGORIES for char in text)


def invisible(max_size: int = 8) -> st.SearchStrategy[str]:
    """Prompts that look like text to a naive check (not all whitespace) but show nothing."""
    chars = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\x00", "\x01", "\x7f", "\u202e"])
    return st.text(chars, min_size=1, max_size=max_size).map(lambda s: " " + s)


good_prompts = st.one_of(
    texts(1, MAX_CHARS).filter(lambda s: s.strip() and shows_something(s)),
    st.sampled_from(["a" * MAX_CHARS, " " + "é" * (MAX_CHARS - 1), "What is 2 + 2?"]),  # at the limits
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts(max_size=10))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts(max_size=5), kids, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts(max_size=8), json_values, max_size=4)
shared_ids = st.sampled_from(["dup-1", "dup-2", 7, ""])  # drawn often, so ids repeat across rows


def long_prompts() -> st.SearchStrategy[str]:
    return st.builds(
        lambda seed, n: (seed * (MAX_CHARS + 1))[: MAX_CHARS + n],
        texts(1, 5).filter(lambda s: s.strip()),
        st.integers(1, 2 * MAX_CHARS),
    )


def whitespace(max_size: int = 8) -> st.SearchStrategy[str]:
    return st.text(SPACES, max_size=max_size)


def expected_row(record: dict) -> dict:
    """What ingestion must store for a good record (fields as parse_record gives them)."""
    raw_id = record.get("id")
    if isinstance(raw_id, float):  # a whole-number float id from Parquet: 3.0 is the id "3"
        raw_id = int(raw_id)
    constraints = record.get("constraints")
    return {
        "prompt": record["prompt"].strip(),
        "system": record.get("system"),
        "task": (record.get("task") or DEFAULT_TASK).strip() or DEFAULT_TASK,
        "external_id": None if raw_id is None else str(raw_id),  # None: a generated 16-hex id
        "constraints": json.dumps(constraints, sort_keys=True) if constraints else None,
    }


def _none_if_missing(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def check_batch(path: Path, batch, good: dict[int, dict], bad: dict[int, tuple[str, ...]]) -> None:
    """good: line -> expected row; bad: line -> accepted reason fragments ('' accepts any reason)."""
    assert_lake_writable(batch)
    rows, quarantine = batch.rows, batch.quarantine
    assert sorted(rows["line_number"]) == sorted(good), "every good row kept exactly once"
    assert sorted(quarantine["line_number"]) == sorted(bad), "every bad row quarantined exactly once"
    for row in rows.to_dict("records"):
        want = good[row["line_number"]]
        assert row["source_file"] == str(path)
        for field in ("prompt", "system", "task", "constraints"):
            assert _none_if_missing(row[field]) == want[field], (field, row, want)
        if want["external_id"] is None:
            assert re.fullmatch(r"[0-9a-f]{16}", row["external_id"])
        else:
            assert row["external_id"] == want["external_id"]
        assert row["prompt_id"] == prompt_id_for(want["prompt"], want["system"], want["constraints"])
    for item in quarantine.to_dict("records"):
        fragments = bad[item["line_number"]]
        assert item["source_file"] == str(path)
        assert any(f in item["reason"] for f in fragments), (item, fragments)


# -- JSONL --------------------------------------------------------------------------------------


@st.composite
def good_records(draw) -> dict:
    record = {"prompt": draw(good_prompts)}
    optional = {
        "task": st.none() | texts(max_size=15) | whitespace(),
        "system": st.none() | texts(max_size=30),
        "id": st.none() | texts(max_size=12) | st.integers() | shared_ids,
        "constraints": st.none() | json_objects,
        "extra": json_values,  # unknown fields are ignored
    }
    for field, strategy in optional.items():
        if draw(st.booleans()):
            record[field] = draw(strategy)
    keys = draw(st.permutations(list(record)))
    return {key: record[key] for key in keys}


def dumps(draw, record) -> bytes:
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8")


WRONG_TYPES = {
    "prompt": st.integers() | st.floats() | st.booleans() | st.lists(texts(), max_size=2) | json_objects,
    "system": st.integers() | st.floats() | st.booleans() | st.lists(texts(), max_size=2) | json_objects,
    "task": st.integers() | st.floats() | st.booleans() | st.lists(texts(), max_size=2) | json_objects,
    "id": st.floats() | st.booleans() | st.lists(st.integers(), max_size=2) | json_objects,
    "constraints": texts() | st.integers() | st.floats() | st.booleans() | st.lists(json_values, max_size=2),
}
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"]


@st.composite
def bad_jsonl_lines(draw) -> tuple[str, bytes, tuple[str, ...]]:
    """(kind, line bytes without newline, reason fragments it may be quarantined with)."""
    kind = draw(
        st.sampled_from(
            [
                "random_bytes",
                "invalid_utf8",
                "deep_nesting",
                "wrong_type",
                "missing_prompt",
                "empty_prompt",
                "too_long",
                "not_an_object",
                "lone_surrogate",
                "huge_integer",
                "truncated",
            ]
        )
    )
    base = draw(good_records())
    if kind == "random_bytes":
        raw = draw(st.binary(min_size=1, max_size=300)).replace(b"\n", b"").replace(b"\r", b"")
        # A line that starts a file with gzip's header makes it a (corrupt) gzip file: tested apart.
        raw = raw if raw.strip() and b"prompt" not in raw and not raw.startswith(b"\x1f\x8b") else b"\x00garbage"
        return kind, raw, ("",)
    if kind == "invalid_utf8":
        head, tail = draw(texts(max_size=10)), draw(texts(max_size=10))
        head, tail = (json.dumps(part, ensure_ascii=False)[1:-1].encode() for part in (head, tail))  # escaped
        raw = b'{"prompt": "' + head + draw(st.sampled_from(INVALID_UTF8)) + tail + b'"}'
        return kind, raw, ("not valid UTF-8",)
    if kind == "deep_nesting":
        depth = draw(st.integers(10_000, 100_000))
        raw = draw(
            st.sampled_from(
                [
                    b"[" * depth,
                    b'{"a":' * depth,
                    b"[" * depth + b"]" * depth,
                    b'{"prompt": "ok", "constraints": {"a": ' + b"[" * depth + b"]" * depth + b"}}",
                ]
            )
        )
        return kind, raw, ("nested too deeply",)
    if kind == "wrong_type":
        field = draw(st.sampled_from(sorted(WRONG_TYPES)))
        base[field] = draw(WRONG_TYPES[field])
        return kind, dumps(draw, base), (f"field '{field}' must be",)
    if kind == "missing_prompt":
        base.pop("prompt")
        return kind, dumps(draw, base), ("missing required field 'prompt'",)
    if kind == "empty_prompt":
        base["prompt"] = draw(st.none() | whitespace() | invisible())
        return kind, dumps(draw, base), ("prompt is empty",)
    if kind == "too_long":
        base["prompt"] = draw(long_prompts())
        return kind, dumps(draw, base), ("prompt too long",)
    if kind == "not_an_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return kind, json.dumps(value).encode(), ("must be a JSON object",)
    if kind == "lone_surrogate":
        field = draw(st.sampled_from(["prompt", "system", "task", "id"]))
        base[field] = "a@SURROGATE@b"
        escape = b"\\u%04x" % draw(st.integers(0xD800, 0xDFFF))
        return kind, dumps(draw, base).replace(b"@SURROGATE@", escape), ("not valid Unicode",)
    if kind == "huge_integer":
        digits = b"9" * draw(st.integers(4301, 20_000))
        return kind, b'{"prompt": "ok", "id": ' + digits + b"}", ("not valid JSON",)
    raw = dumps(draw, base)  # truncated: no prefix of an object is valid JSON
    return kind, raw[: draw(st.integers(1, len(raw) - 1))], ("not valid JSON", "not valid UTF-8")


jsonl_items = st.one_of(
    st.tuples(good_records(), st.booleans()).map(lambda good: ("good", good)),  # (record, ensure_ascii)
    bad_jsonl_lines().map(lambda bad: ("bad", bad)),
    st.sampled_from([b"", b" ", b"\t ", b"\x0b\x0c"]).map(lambda blank: ("blank", blank)),
)
# The inputs that found bugs, each class in one file, with good rows around them.
BUGS_JSONL = [
    ("good", ({"id": "dup-1", "prompt": "first"}, False)),  # after a byte order mark
    ("bad", ("lone_surrogate", b'{"prompt": "a\\ud800b"}', ("not valid Unicode",))),
    ("bad", ("huge_integer", b'{"prompt": "ok", "id": ' + b"9" * 4301 + b"}", ("not valid JSON",))),
    ("bad", ("wrong_type", b'{"prompt": "ok", "id": true}', ("field 'id' must be",))),
    ("bad", ("wrong_type", b'{"prompt": "ok", "constraints": []}', ("field 'constraints' must be",))),
    ("bad", ("empty_prompt", json.dumps({"prompt": " \u200b\ufeff\x00"}).encode(), ("prompt is empty",))),
    ("bad", ("deep_nesting", b"[" * 10_000, ("nested too deeply",))),
    ("bad", ("invalid_utf8", b'{"prompt": "caf\xe9"}', ("not valid UTF-8",))),
    ("bad", ("random_bytes", b"\x1f\x8b\x00 gzip's magic but not deflate: not gzip", ("",))),
    ("blank", b"\x0b\x0c"),
    ("good", ({"id": "dup-1", "prompt": "caf\u00e9 \U0001f600", "task": " "}, False)),  # the same id again
]


@fuzz(full=1000)
@given(
    items=st.lists(jsonl_items, max_size=30),
    end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    final_newline=st.booleans(),
    suffix=st.sampled_from([".jsonl", ".json"]),
    bom=st.booleans(),
)
@example(items=BUGS_JSONL, end=b"\r", final_newline=True, suffix=".jsonl", bom=True)  # CR-only lines
@example(items=BUGS_JSONL, end=b"\r\n", final_newline=False, suffix=".json", bom=False)
@example(
    items=[BUGS_JSONL[-3], ("blank", b""), BUGS_JSONL[0]], end=b"\n", final_newline=True, suffix=".jsonl", bom=False
)
def test_jsonl_every_good_row_kept_and_every_bad_line_quarantined(items, end, final_newline, suffix, bom):
    CASES["jsonl"] += 1
    lines, good, bad = [], {}, {}
    for number, (kind, item) in enumerate(items, start=1):
        if kind == "good":
            record, ensure_ascii = item
            lines.append(json.dumps(record, ensure_ascii=ensure_ascii).encode())
            good[number] = expected_row(record)
        elif kind == "bad":
            lines.append(item[1])
            bad[number] = item[2]
        else:
            lines.append(item)
    bom = bom and bool(lines) and bool(lines[0].strip())  # a byte order mark before the first row
    content = (codecs.BOM_UTF8 if bom else b"") + end.join(lines) + (end if final_newline and lines else b"")
    assume(suffix == ".jsonl" or whole_json_array(content) is None)  # an array: test_json_array_...
    path, batch = ingest(suffix, content)  # never raises
    check_batch(path, batch, good, bad)
    assert len(batch.rows) + len(batch.quarantine) == sum(1 for line in lines if line.strip())


# -- JSON arrays --------------------------------------------------------------------------------


def whole_json_array(data: bytes) -> list | None:
    """The elements when a .json file's whole content is one JSON array (then it is read as one), else None."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else None


@st.composite
def bad_array_elements(draw) -> tuple[object, tuple[str, ...]]:
    """(a JSON value that is not a good row, reason fragments it may be quarantined with)."""
    kind = draw(
        st.sampled_from(["wrong_type", "missing_prompt", "empty_prompt", "too_long", "not_an_object", "lone_surrogate"])
    )
    base = draw(good_records())
    if kind == "wrong_type":
        field = draw(st.sampled_from(sorted(WRONG_TYPES)))
        base[field] = draw(WRONG_TYPES[field])
        return base, (f"field '{field}' must be",)
    if kind == "missing_prompt":
        base.pop("prompt")
        return base, ("missing required field 'prompt'",)
    if kind == "empty_prompt":
        base["prompt"] = draw(st.none() | whitespace() | invisible())
        return base, ("prompt is empty",)
    if kind == "too_long":
        base["prompt"] = draw(long_prompts())
        return base, ("prompt too long",)
    if kind == "not_an_object":
        return draw(json_values.filter(lambda v: not isinstance(v, dict))), ("must be a JSON object",)
    field = draw(st.sampled_from(["prompt", "system", "task", "id"]))
    base[field] = "a" + chr(draw(st.integers(0xD800, 0xDFFF))) + "b"  # json.dumps writes it as a \u escape
    return base, ("not valid Unicode",)


@fuzz(full=500)
@given(
    items=st.lists(
        good_records().map(lambda r: ("good", r)) | bad_array_elements().map(lambda b: ("bad", b)), max_size=30
    ),
    indent=st.sampled_from([None, 0, 2]),
    bom=st.booleans(),
    padding=st.text(st.sampled_from(" \t\r\n"), max_size=4),
    ensure_ascii=st.booleans(),
)
@example(
    items=[
        ("good", {"id": 7, "prompt": "first"}),
        ("bad", ({"prompt": "a\ud800b"}, ("not valid Unicode",))),
        ("bad", ({"prompt": "ok", "id": True}, ("field 'id' must be",))),
        ("bad", ([1, 2], ("must be a JSON object",))),
        ("bad", ({"prompt": " \u200b\ufeff"}, ("prompt is empty",))),
        ("bad", ({"prompt": "x" * (MAX_CHARS + 1)}, ("prompt too long",))),
        ("good", {"id": 7, "prompt": "caf\u00e9", "constraints": {"max_words": 2**70}}),
    ],
    indent=0,
    bom=True,
    padding="\r",
    ensure_ascii=False,
)
def test_json_array_every_good_element_kept_and_every_bad_one_quarantined(items, indent, bom, padding, ensure_ascii):
    CASES["json_array"] += 1
    values, good, bad = [], {}, {}
    for number, (kind, item) in enumerate(items, start=1):
        value, expected = (item, None) if kind == "good" else item
        values.append(value)
        if kind == "good":
            good[number] = expected_row(item)
        else:
            bad[number] = expected
    surrogates = any(kind == "bad" and "not valid Unicode" in item[1] for kind, item in items)
    text = json.dumps(values, indent=indent, ensure_ascii=ensure_ascii or surrogates)
    content = (codecs.BOM_UTF8 if bom else b"") + (padding + text + padding).encode()
    path, batch = ingest(".json", content)  # never raises
    check_batch(path, batch, good, bad)  # rows are numbered by element, 1, 2, ...


# -- CSV ----------------------------------------------------------------------------------------

CSV_COLUMNS = ["id", "task", "system", "note"]
# Field values of good rows may hold commas, quotes and newlines (then they are quoted), but do not
# start with a quote, comma or line break: that keeps the recovery after a stray quote unambiguous.
_CLOSES_A_QUOTE = ('"', ",", "\r", "\n")
csv_values = texts(max_size=30).filter(lambda s: not s.startswith(_CLOSES_A_QUOTE))
csv_prompts = good_prompts.filter(lambda s: not s.startswith(_CLOSES_A_QUOTE))
simple_values = st.text(
    st.characters(exclude_categories=("Cs", "Cc"), exclude_characters='",'), min_size=1, max_size=12
).filter(lambda s: s.strip())


def csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\r\n') else value


def csv_line(values: list[str]) -> str:
    return '""' if values == [""] else ",".join(map(csv_field, values))


@st.composite
def csv_items(draw, header: list[str]) -> tuple[str, bytes, object]:
    """('good', bytes, expected row) | ('bad', bytes, reason fragments) | ('blank', b'', None)."""
    kind = draw(
        st.sampled_from(
            [
                "good",
                "good",
                "good",
                "literal_quote",
                "blank",
                "wrong_field_count",
                "unclosed_quote",
                "quote_then_junk",
                "invalid_utf8",
                "empty_prompt",
                "missing_prompt",
                "too_long",
                "garbage",
            ]
        )
    )
    record = {name: draw(csv_values) for name in header}
    record["prompt"] = draw(csv_prompts)
    if kind == "blank":
        return "blank", b"", None
    if kind in ("good", "literal_quote"):
        if kind == "literal_quote":  # a quote inside an unquoted field is literal text
            record["prompt"] = draw(simple_values) + '"' + draw(simple_values)
        present = {k: v for k, v in record.items() if v != "" and k != "note"}
        text = (
            ",".join(
                record[name] if name == "prompt" and kind == "literal_quote" else csv_field(record[name])
                for name in header
            )
            if len(header) > 1 or kind == "literal_quote"
            else csv_line([record["prompt"]])
        )
        return "good", text.encode(), expected_row(present)
    simple = [draw(simple_values) for _ in header]
    assert "prompt" in header
    if kind == "wrong_field_count":
        count = draw(st.integers(1, len(header) + 3).filter(lambda n: n != len(header)))
        return "bad", ",".join(draw(simple_values) for _ in range(count)).encode(), ("wrong number of fields",)
    if kind == "unclosed_quote":
        at = draw(st.integers(0, len(header) - 1))
        simple[at] = '"' + simple[at]
        return "bad", ",".join(simple).encode(), ("not valid CSV",)
    if kind == "quote_then_junk":
        at = draw(st.integers(0, len(header) - 1))
        simple[at] = f'"{simple[at]}"{draw(simple_values)}'
        return "bad", ",".join(simple).encode(), ("not valid CSV",)
    if kind == "invalid_utf8":
        at = draw(st.integers(0, len(header) - 1))
        fields = [value.encode() for value in simple]
        fields[at] += draw(st.sampled_from(INVALID_UTF8))
        return "bad", b",".join(fields), ("not valid UTF-8",)
    if kind == "garbage":  # random bytes (no quotes or line breaks), never valid UTF-8
        noise = draw(st.binary(max_size=200)).translate(None, b'"\r\n')
        return "bad", b"\xff" + noise, ("not valid UTF-8", "wrong number of fields")
    record = dict(zip(header, simple))
    if kind == "empty_prompt":
        record["prompt"] = draw(whitespace(6).filter(lambda s: s and not s.startswith(_CLOSES_A_QUOTE)))
        fragment = "prompt is empty"
    elif kind == "missing_prompt":
        record["prompt"], fragment = "", "missing required field 'prompt'"
    else:
        record["prompt"] = draw(long_prompts().filter(lambda s: not s.startswith(_CLOSES_A_QUOTE)))
        fragment = "prompt too long"
    return "bad", csv_line([record[name] for name in header]).encode(), (fragment,)


@st.composite
def csv_files(draw):
    header = draw(st.permutations(["prompt"] + draw(st.lists(st.sampled_from(CSV_COLUMNS), unique=True))))
    return header, draw(st.lists(csv_items(header), max_size=25))


def _csv_good(raw: bytes, prompt: str, log_id: str) -> tuple[str, bytes, dict]:
    return "good", raw, expected_row({"prompt": prompt, "id": log_id})


BUGS_CSV = (
    ["prompt", "id"],
    [
        _csv_good(b'"two\rlines",1', "two\rlines", "1"),  # a line break inside quotes
        _csv_good(b'he said "hi",2', 'he said "hi"', "2"),  # a literal quote in an unquoted field
        ("bad", b'"unclosed,3', ("not valid CSV",)),  # swallows the next line, which is read again
        _csv_good(b"kept,4", "kept", "4"),
        ("bad", b'"closed"junk,5', ("not valid CSV",)),
        ("bad", b"caf\xe9,6", ("not valid UTF-8",)),
        ("bad", b"a,b,c", ("wrong number of fields",)),
        ("blank", b"", None),
        ("bad", " \u200b,8".encode(), ("prompt is empty",)),
        ("bad", b",9", ("missing required field 'prompt'",)),
        _csv_good("caf\u00e9 \U0001f600,10".encode(), "caf\u00e9 \U0001f600", "10"),
    ],
)


@fuzz(full=800)
@given(spec=csv_files(), end=st.sampled_from([b"\n", b"\r\n", b"\r"]), final_newline=st.booleans(), bom=st.booleans())
@example(spec=BUGS_CSV, end=b"\r", final_newline=False, bom=True)  # CR-only lines after a byte order mark
@example(spec=BUGS_CSV, end=b"\r\n", final_newline=True, bom=False)
def test_csv_every_good_row_kept_and_every_bad_row_quarantined(spec, end, final_newline, bom):
    CASES["csv"] += 1
    header, items = spec
    lines = [",".join(header).encode()] + [raw for _, raw, _ in items]
    content = (codecs.BOM_UTF8 if bom else b"") + end.join(lines) + (end if final_newline else b"")
    good, bad, number = {}, {}, 0
    for kind, _, expected in items:  # rows are numbered 1, 2, ... skipping blank lines
        if kind != "blank":
            number += 1
            (good if kind == "good" else bad)[number] = expected
    path, batch = ingest(".csv", content)  # never raises
    check_batch(path, batch, good, bad)


# -- Parquet ------------------------------------------------------------------------------------

_TS = datetime.datetime(2026, 1, 2, 3, 4, 5)
# Per column: (arrow type, value strategy, reason fragment for a non-null value, or None if valid).
PROMPT_COLUMNS = {
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1), "field 'prompt' must be a string"),
    "float": (pa.float64(), st.floats(), "field 'prompt' must be a string"),
    "bool": (pa.bool_(), st.booleans(), "field 'prompt' must be a string"),
    "binary": (pa.binary(), st.binary(max_size=10), "field 'prompt' must be a string"),
    "list": (pa.list_(pa.string()), st.lists(texts(max_size=5), max_size=2), "field 'prompt' must be a string"),
    "timestamp": (pa.timestamp("us"), st.just(_TS), "field 'prompt' must be a string"),
}
TEXT_COLUMNS = {  # task and system
    "string": (pa.string(), texts(max_size=20), None),
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1), "must be a string"),
    "bool": (pa.bool_(), st.booleans(), "must be a string"),
    "list": (pa.list_(pa.string()), st.lists(texts(max_size=5), max_size=2), "must be a string"),
}
ID_COLUMNS = {
    "string": (pa.string(), texts(max_size=12) | st.sampled_from(["dup-1", "dup-2"]), None),
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1) | st.just(7), None),
    "whole_float": (
        pa.float64(),
        st.integers(-(2**53), 2**53).map(float) | st.sampled_from([-0.0, 1e20, 2.0**70]),
        None,
    ),
    "float": (
        pa.float64(),
        st.floats().filter(lambda f: not f.is_integer()),  # NaN, infinities, fractions
        "field 'id' must be a string or integer, got float",
    ),
    "bool": (pa.bool_(), st.booleans(), "field 'id' must be a string or integer"),
}
_GOOD_STRUCT = pa.struct([("max_words", pa.int64()), ("format", pa.string()), ("choices", pa.list_(pa.string()))])
CONSTRAINT_COLUMNS = {
    "struct": (
        _GOOD_STRUCT,
        st.fixed_dictionaries(
            {
                "max_words": st.none() | st.integers(-(2**63), 2**63 - 1),
                "format": st.none() | texts(max_size=8),
                "choices": st.none() | st.lists(texts(max_size=5), max_size=3),
            }
        ),
        None,
    ),
    "struct_timestamp": (
        pa.struct([("after", pa.timestamp("us"))]),
        st.just({"after": _TS}),
        "field 'constraints' is not JSON-serialisable",
    ),
    "struct_binary": (
        pa.struct([("blob", pa.binary())]),
        st.binary(max_size=8).map(lambda b: {"blob": b}),
        "field 'constraints' is not JSON-serialisable",
    ),
    "string": (pa.string(), texts(max_size=10), "field 'constraints' must be a JSON object"),
    "list": (
        pa.list_(pa.int64()),
        st.lists(st.integers(0, 9), max_size=3),
        "field 'constraints' must be a JSON object",
    ),
}


@st.composite
def parquet_files(draw):
    """(table, good: row -> expected row, bad: row -> reason fragments)."""
    n = draw(st.integers(1, 12))
    columns: dict[str, pa.Array] = {}
    problems: list[dict[str, str]] = [{} for _ in range(n)]
    records: list[dict] = [{} for _ in range(n)]
    prompt_kind = draw(st.sampled_from(["string"] * 4 + sorted(PROMPT_COLUMNS) + ["absent"]))
    if prompt_kind == "string":
        values = []
        for i in range(n):
            choice = draw(st.sampled_from(["good", "good", "good", "null", "empty", "long"]))
            value = {
                "good": good_prompts,
                "null": st.none(),
                "empty": whitespace() | invisible(),
                "long": long_prompts(),
            }[choice]
            values.append(draw(value))
            if choice != "good":
                problems[i]["prompt"] = {
                    "null": "missing required field 'prompt'",
                    "empty": "prompt is empty",
                    "long": "prompt too long",
                }[choice]
            records[i]["prompt"] = values[-1]
        columns["prompt"] = pa.array(values, pa.string())
    elif prompt_kind == "absent":
        for problem in problems:
            problem["prompt"] = "missing required field 'prompt'"
    else:
        arrow_type, strategy, reason = PROMPT_COLUMNS[prompt_kind]
        values = [draw(strategy) for _ in range(n)]
        columns["prompt"] = pa.array(values, arrow_type)
        for problem in problems:
            problem["prompt"] = reason
    for field, kinds in (
        ("system", TEXT_COLUMNS),
        ("task", TEXT_COLUMNS),
        ("id", ID_COLUMNS),
        ("constraints", CONSTRAINT_COLUMNS),
    ):
        kind = draw(st.sampled_from(["absent", *sorted(kinds)]))
        if kind == "absent":
            continue
        arrow_type, strategy, reason = kinds[kind]
        values = [draw(st.none() | strategy) for _ in range(n)]  # null is the same as absent
        columns[field] = pa.array(values, arrow_type)
        for i, value in enumerate(values):
            if value is None:
                continue
            records[i][field] = value
            if reason is not None:
                problems[i][field] = f"field '{field}' {reason}" if reason.startswith("must") else reason
    if not columns:
        columns["note"] = pa.array(["x"] * n)
    good, bad = {}, {}
    for i, (record, problem) in enumerate(zip(records, problems), start=1):
        first = next((problem[f] for f in ("prompt", "system", "task", "id", "constraints") if f in problem), None)
        if first is None:
            good[i] = expected_row(record)
        else:
            bad[i] = (first,)
    return pa.table(columns), good, bad


def _parquet_spec(columns: dict, good: dict[int, dict], bad: dict[int, str]):
    """A parquet_files() value written by hand: (table, row -> expected row, row -> reason)."""
    return pa.table(columns), {i: expected_row(r) for i, r in good.items()}, {i: (reason,) for i, reason in bad.items()}


_NOT_AN_ID = "field 'id' must be a string or integer"
BUGS_PARQUET = [
    _parquet_spec(  # float ids: whole ones (as pandas writes an integer column with nulls) are kept
        {
            "prompt": pa.array(["ok 1", "ok 2", "ok 3", " \u200b", "ok 5", "ok 6", "x" * (MAX_CHARS + 1)]),
            "id": pa.array([2.0**70, math.nan, -0.0, 3.0, 2.5, None, 1.0], pa.float64()),
        },
        good={1: {"prompt": "ok 1", "id": 2.0**70}, 3: {"prompt": "ok 3", "id": -0.0}, 6: {"prompt": "ok 6"}},
        bad={2: f"{_NOT_AN_ID}, got float", 4: "prompt is empty", 5: f"{_NOT_AN_ID}, got float", 7: "prompt too long"},
    ),
    _parquet_spec(  # booleans are not ids or text; a timestamp in a struct is not JSON
        {
            "prompt": pa.array(["a", "b", "c", "d", "e"]),
            "task": pa.array([True, None, None, False, None], pa.bool_()),
            "id": pa.array([None, None, True, None, None], pa.bool_()),
            "constraints": pa.array(
                [None, {"after": _TS}, None, None, None], pa.struct([("after", pa.timestamp("us"))])
            ),
        },
        good={5: {"prompt": "e"}},
        bad={
            1: "field 'task' must be a string",
            2: "field 'constraints' is not JSON-serialisable",
            3: _NOT_AN_ID,
            4: "field 'task' must be a string",
        },
    ),
    _parquet_spec(  # a prompt column that is not text; bytes in a struct
        {
            "prompt": pa.array([5, -(2**63)], pa.int64()),
            "constraints": pa.array([{"blob": b"\x00"}, None], pa.struct([("blob", pa.binary())])),
        },
        good={},
        bad={1: "field 'prompt' must be a string", 2: "field 'prompt' must be a string"},
    ),
]


@fuzz(full=500)
@given(spec=parquet_files(), row_group_size=st.integers(1, 12))
@example(spec=BUGS_PARQUET[0], row_group_size=3)
@example(spec=BUGS_PARQUET[1], row_group_size=1)
@example(spec=BUGS_PARQUET[2], row_group_size=12)
def test_parquet_wrong_column_types_are_quarantined_per_row(spec, row_group_size):
    CASES["parquet"] += 1
    table, good, bad = spec
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    path, batch = ingest(".parquet", buffer.getvalue())  # never raises
    check_batch(path, batch, good, bad)


@fuzz(full=300)
@given(
    spec=parquet_files(),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=20),
    compression=st.sampled_from(["snappy", "none", "zstd"]),
)
@example(  # a corrupt page inside a file whose footer is intact: found only when its batch is decoded
    spec=(pa.table({"prompt": [f"prompt number {i}" for i in range(200)]}), {}, {}),
    flips=[(position, 0xFF) for position in range(40, 90)],
    compression="snappy",
)
def test_corrupt_parquet_is_reported_unreadable_or_read_never_crashes(spec, flips, compression):
    CASES["parquet_corrupt"] += 1
    buffer = io.BytesIO()
    pq.write_table(spec[0], buffer, compression=compression)
    data = bytearray(buffer.getvalue())
    for position, value in flips:
        data[position % len(data)] = value
    try:
        _, batch = ingest(".parquet", bytes(data))
    except UnreadableLogFile as error:
        assert "not a readable Parquet file" in str(error)
    else:
        assert_lake_writable(batch)


# -- whole files of garbage ---------------------------------------------------------------------


@fuzz(full=500)
@given(
    data=st.binary(max_size=3000) | st.lists(st.binary(max_size=80), max_size=40).map(b"\n".join),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
)
@example(data=b"\x1f\x8b\x00 not deflate\nso not gzip", suffix=".jsonl")  # read line by line
@example(data=b"\x1f\x8b\x08 gzip's header, then garbage", suffix=".jsonl")  # a corrupt deflate stream (zlib.error)
@example(data=codecs.BOM_UTF8, suffix=".jsonl")
@example(data=b"a\rb\r\nc\n\rd\r", suffix=".json")  # every kind of line end
@example(data=b"[" * 50_000, suffix=".json")  # too deep to be an array: read as JSONL
@example(data=b"9" * 5000, suffix=".json")  # a huge integer
@example(data=b'[1, {"prompt": "x"}, "\\ud800"]', suffix=".json")
@example(data=b"", suffix=".csv")
@example(data=b"prompt\r\xff\xfe\r", suffix=".csv")
@example(data=b"PAR1" + bytes(range(256)) + b"PAR1", suffix=".parquet")
def test_random_bytes_never_crash_ingestion(data, suffix):
    CASES["random_bytes"] += 1
    try:
        _, batch = ingest(suffix, data)
    except UnreadableLogFile as error:
        gzip_magic = data.startswith(b"\x1f\x8b\x08")  # read as gzip, whatever the name: may be corrupt as a whole
        assert suffix in (".csv", ".parquet") or gzip_magic, "a JSONL file is read line by line, never unreadable"
        assert "not a readable" in str(error)
        return
    assert suffix != ".parquet", "random bytes are not a Parquet file"
    assert_lake_writable(batch)
    if suffix in (".jsonl", ".json"):
        array = whole_json_array(data) if suffix == ".json" else None
        rows = len(array) if array is not None else sum(1 for line in LINE_BREAK.split(data) if line.strip())
        assert len(batch.rows) + len(batch.quarantine) == rows


# -- explicit cases -----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_a_50_mb_single_line_is_quarantined_as_too_long_and_the_next_line_kept(tmp_path):
    path = tmp_path / "huge.jsonl"
    size = 50 * 1024 * 1024
    with path.open("wb") as handle:  # streamed, so the test itself holds no 50 MB copy
        handle.write(b'{"id": "huge", "prompt": "')
        for _ in range(50):
            handle.write(b"a" * (1024 * 1024))
        handle.write(b'"}\n{"id": "next", "prompt": "still here"}\n')
    tracemalloc.start()
    try:
        batch = ingest_file(path, DataSettings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [reason] = batch.quarantine["reason"]
    line_bytes = len(b'{"id": "huge", "prompt": "') + size + len(b'"}')
    assert f"line too long: {line_bytes} bytes > data.max_line_bytes=" in reason, reason
    assert batch.quarantine["line_number"].tolist() == [1]
    assert len(batch.quarantine["raw"].iloc[0]) <= 500
    assert batch.rows[["external_id", "prompt", "line_number"]].values.tolist() == [["next", "still here", 2]]
    assert peak < 6 * size, f"peak {peak / 2**20:.0f} MiB for a 50 MiB line"  # a few copies of the line, no more
    assert_lake_writable(batch)


def test_a_50_mb_csv_field_is_quarantined_and_the_next_row_kept(tmp_path):
    path = tmp_path / "huge.csv"
    with path.open("wb") as handle:
        handle.write(b"id,prompt\nhuge,")
        for _ in range(50):
            handle.write(b"a" * (1024 * 1024))
        handle.write(b"\nnext,still here\n")
    batch = ingest_file(path, DataSettings())
    assert batch.quarantine["line_number"].tolist() == [1]
    reason = batch.quarantine["reason"].iloc[0]
    assert reason.startswith("line too long: ") and "> data.max_line_bytes=" in reason, reason
    assert batch.rows[["external_id", "prompt", "line_number"]].values.tolist() == [["next", "still here", 2]]


def test_deeply_nested_json_lines_are_quarantined(tmp_path):
    depth = 100_000
    path = write_lines(
        tmp_path / "deep.jsonl",
        [
            b"[" * depth,
            b"[" * depth + b"]" * depth,
            b'{"a":' * depth + b"1" + b"}" * depth,
            b'{"prompt": "x", "constraints": {"a": ' + b"[" * depth + b"]" * depth + b"}}",
            b'{"prompt": "kept", "constraints": {"a": ' + b"[" * 50 + b"]" * 50 + b"}}",  # nested, but not deeply
        ],
    )
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine["line_number"].tolist() == [1, 2, 3, 4]
    assert all("nested too deeply" in reason for reason in batch.quarantine["reason"])
    assert batch.rows["prompt"].tolist() == ["kept"]
    assert_lake_writable(batch)


def test_a_jsonl_file_of_only_random_bytes_quarantines_every_line(tmp_path):
    import random

    rng = random.Random(20260)
    data = bytes(rng.randrange(256) for _ in range(200_000))
    path = tmp_path / "noise.jsonl"
    path.write_bytes(data)
    batch = ingest_file(path, LIMITS)
    assert batch.rows.empty
    assert len(batch.quarantine) == sum(1 for line in LINE_BREAK.split(data) if line.strip()) > 100
    assert_lake_writable(batch)


def test_a_gzip_header_then_garbage_is_reported_unreadable(tmp_path):
    path = tmp_path / "logs.jsonl"
    path.write_bytes(b"\x1f\x8b\x08 gzip's header, then garbage")
    with pytest.raises(UnreadableLogFile, match="not a readable gzip file"):
        ingest_file(path, LIMITS)


def test_random_bytes_named_parquet_are_reported_unreadable(tmp_path):
    path = tmp_path / "noise.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 10 + b"PAR1")
    with pytest.raises(UnreadableLogFile, match="not a readable Parquet file"):
        ingest_file(path, LIMITS)


def test_a_corrupt_parquet_page_is_reported_unreadable_not_a_crash(tmp_path):
    path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(5000)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[200:400] = b"\xff" * 200  # inside the first data page; the footer stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableLogFile, match="not a readable Parquet file"):
        ingest_file(path, LIMITS)


def test_parquet_constraints_that_are_not_json_are_quarantined(tmp_path):
    path = tmp_path / "app.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt": ["a", "b", "c"],
                "constraints": pa.array(
                    [{"after": _TS}, None, {"after": None}], pa.struct([("after", pa.timestamp("us"))])
                ),
            }
        ),
        path,
    )
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine["line_number"].tolist() == [1]
    assert "not JSON-serialisable" in batch.quarantine["reason"].iloc[0]
    assert batch.rows["prompt"].tolist() == ["b", "c"]
    assert [_none_if_missing(c) for c in batch.rows["constraints"]] == [None, '{"after": null}']


def test_duplicate_ids_are_all_kept_with_distinct_log_ids(tmp_path):
    path = write_lines(
        tmp_path / "dup.jsonl",
        [
            json.dumps({"id": "same", "prompt": "first"}).encode(),
            json.dumps({"id": "same", "prompt": "second"}).encode(),
            json.dumps({"id": "same", "prompt": "first"}).encode(),
        ],
    )
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine.empty
    assert batch.rows["external_id"].tolist() == ["same"] * 3
    assert batch.rows["log_id"].is_unique
    assert batch.rows["line_number"].tolist() == [1, 2, 3]


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + b'{"prompt": "first"}\n{"prompt": "second"}\n')
    csv = tmp_path / "bom.csv"
    csv.write_bytes(codecs.BOM_UTF8 + b"prompt,task\nfirst,general\n")
    assert ingest_file(jsonl, LIMITS).rows["prompt"].tolist() == ["first", "second"]
    assert ingest_file(csv, LIMITS).rows["prompt"].tolist() == ["first"]


def test_json_escapes_that_are_not_unicode_are_quarantined(tmp_path):
    path = write_lines(
        tmp_path / "escapes.jsonl",
        [
            b'{"prompt": "lone \\ud800 surrogate"}',
            b'{"prompt": "ok", "system": "\\udfff"}',
            b'{"prompt": "pair \\ud83d\\ude00 is fine"}',
            b'{"prompt": "ok", "id": ' + b"1" * 5000 + b"}",
            b'{"prompt": "ok", "id": true}',
        ],
    )
    batch = ingest_file(path, LIMITS)
    reasons = dict(zip(batch.quarantine["line_number"], batch.quarantine["reason"]))
    assert sorted(reasons) == [1, 2, 4, 5]
    assert "field 'prompt' is not valid Unicode" in reasons[1]
    assert "field 'system' is not valid Unicode" in reasons[2]
    assert "not valid JSON" in reasons[4] and "4300 digits" in reasons[4]
    assert "field 'id' must be a string or integer, got bool" in reasons[5]
    assert batch.rows["prompt"].tolist() == ["pair \U0001f600 is fine"]
    assert_lake_writable(batch)


def test_a_stray_quote_in_csv_costs_only_its_own_row(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_bytes(
        b"id,prompt\n"
        b'1,he said "hi" there\n'  # a quote inside an unquoted field is literal text
        b'2,"unclosed\n'  # an unclosed quote would swallow the rest of the file
        b"3,kept\n"
        b'4,"multi\nline, quoted"\n'
        b'5,"closed"junk\n'
        b"6,a,b\n"
        b"7,last\n"
    )
    batch = ingest_file(path, LIMITS)
    assert batch.rows[["external_id", "line_number"]].values.tolist() == [["1", 1], ["3", 3], ["4", 4], ["7", 7]]
    assert batch.rows["prompt"].tolist() == ['he said "hi" there', "kept", "multi\nline, quoted", "last"]
    reasons = dict(zip(batch.quarantine["line_number"], batch.quarantine["reason"]))
    assert reasons == {
        2: "not valid CSV: ',' expected after '\"'",  # where the swallowed text met row 4
        5: "not valid CSV: ',' expected after '\"'",
        6: "CSV row has the wrong number of fields",
    }
    assert batch.quarantine.set_index("line_number").loc[2, "raw"] == '2,"unclosed'
    path.write_bytes(b'id,prompt\n1,"unclosed to the end\n2,swallowed then read again\n')
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine[["line_number", "reason"]].values.tolist() == [[1, "not valid CSV: unexpected end of data"]]
    assert batch.rows[["external_id", "line_number"]].values.tolist() == [["2", 2]]


def test_csv_line_endings_of_every_kind_are_read(tmp_path):
    path = tmp_path / "endings.csv"
    for end in (b"\n", b"\r\n", b"\r"):
        path.write_bytes(end.join([b"prompt,task", b'"two' + end + b'lines",general', b"one,general", b""]))
        batch = ingest_file(path, LIMITS)
        assert batch.quarantine.empty
        assert batch.rows["prompt"].tolist() == ["two" + end.decode() + "lines", "one"]


def test_csv_invalid_utf8_costs_only_its_own_row(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,task\ncaf\xe9,general\nfine,general\n")
    batch = ingest_file(path, LIMITS)
    assert batch.rows["prompt"].tolist() == ["fine"]
    assert batch.quarantine[["line_number", "reason"]].values.tolist() == [[1, "line is not valid UTF-8"]]
    assert "caf" in batch.quarantine["raw"].iloc[0]


def test_a_csv_without_a_readable_header_is_unreadable(tmp_path):
    for name, data in (("empty.csv", b""), ("binary.csv", b"\xff\xfe\x00garbage\n1,2\n")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UnreadableLogFile, match="not a readable CSV file"):
            ingest_file(path, LIMITS)


def test_existing_csv_output_of_pandas_is_read_unchanged(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b"], "prompt": ['say "x", then y', "two\nlines"], "task": ["", "arithmetic"]})
    path = tmp_path / "pandas.csv"
    frame.to_csv(path, index=False)
    batch = ingest_file(path, LIMITS)
    assert batch.quarantine.empty
    assert batch.rows[["external_id", "prompt", "task", "line_number"]].values.tolist() == [
        ["a", 'say "x", then y', DEFAULT_TASK, 1],
        ["b", "two\nlines", "arithmetic", 2],
    ]

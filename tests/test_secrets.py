"""API keys for judge endpoints come from environment variables and never appear in logs, metadata or the lake.

A hostile OpenAI-compatible judge on 127.0.0.1 echoes the Authorization header back everywhere
it can: in the judge's text, in 401/403/400 error bodies (at every offset, so that cutting the
body short would leave a piece of the key), in non-JSON bodies and in 5xx bodies. A whole
round runs through Dagster with that judge; then every file under the home folder (lake,
judge cache, registry, checkpoints, the Dagster instance's event log and compute logs),
everything printed or logged, every Failed reason and the repr of the scorer and settings are
searched for the key and for any 10-character piece of it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import logging
import sqlite3
import urllib.parse
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.judge import LLMJudgeScorer
from tao_pipeline.settings import ScoringSettings, load_settings
from tests import judge_server
from tests.helpers import write_tiny_config
from tests.judge_server import FakeJudgeServer, chat_completion

KEY_ENV = "TAO_SECRETS_TEST_JUDGE_KEY"
# '/', '+' and '\\' change under JSON, URL and HTML escaping: the key must not survive any of them.
SECRET = "sk-tao-Zq8w/XvR2+mKp5\\LtN9bYc3HdJ7fGs4Wq6E"
FRAGMENT = 10


def encodings(text: str) -> dict[str, str]:
    """The forms a server may echo a header in."""
    raw = text.encode()
    return {
        "raw": text,
        "json": json.dumps(text)[1:-1],
        "json-slash": json.dumps(text)[1:-1].replace("/", "\\/"),
        "url": urllib.parse.quote(text, safe=""),
        "html": html.escape(text),
        "unicode": "".join(f"\\u{ord(c):04x}" for c in text),
        "base64": base64.b64encode(raw).decode(),
        "hex": raw.hex(),
    }


def _pieces(form: str, skip: int = 0) -> set[str]:
    return {form[i : i + FRAGMENT] for i in range(skip, len(form) - FRAGMENT + 1)}


# Any 10 characters in a row of the key, or of an encoded form of it, count as a leak ("sk-tao-Zq8" is as
# bad as the whole). Base64 of the whole header: its first 12 characters carry "Bearer ", not the key.
PIECES = sorted(
    set().union(*(_pieces(form) for name, form in encodings(SECRET).items() if name != "base64"))
    | _pieces(encodings("Bearer " + SECRET)["base64"][:-4], skip=12)
)
CONTEXT = PromptContext("Name a colour. Answer with one word.", "short_answer", "You are a concise assistant.")


def leaks(text: str | bytes) -> list[str]:
    """The pieces of the key found in text (bytes are searched as UTF-8 and as UTF-16)."""
    if isinstance(text, bytes):
        found = {piece for piece in PIECES if piece.encode() in text or piece.encode("utf-16-le") in text}
        return sorted(found)
    return [piece for piece in PIECES if piece in text]


# -- a judge that echoes the key back --------------------------------------------------------


def echoing_judge(body: dict, headers: dict) -> tuple[int, str]:
    """Deterministic by request: mostly a score with the header echoed in the text, sometimes an error echoing it."""
    authorization = headers.get("Authorization", "<none>")
    user = body["messages"][-1]["content"]
    kind = int(hashlib.sha256(user.encode()).hexdigest(), 16) % 8
    if kind == 0:  # an error body where the key sits right across the point a 120-character excerpt ends
        pad = "x" * (33 + int(hashlib.sha256(user.encode()).hexdigest()[:2], 16) % 18)
        return 401, json.dumps({"error": {"message": f"{pad} Incorrect API key provided: {authorization}"}})
    if kind == 1:
        return 200, f"<html>upstream proxy saw {authorization}</html>"  # not JSON
    if kind == 2:
        return 503, f"overloaded, retry later ({authorization})"
    if kind in (3, 4, 5):  # the header echoed escaped or encoded, in an error body or in the judge's text
        form = encodings(authorization)[["json-slash", "url", "base64"][kind - 3]]
        return (400, f"bad header {form}") if kind == 3 else (200, chat_completion(f"Saw {form}. Score: 5"))
    score = 1 + len(user) % 10
    return 200, chat_completion(f"Request carried {authorization}. Score: {score}")


@pytest.fixture
def server():
    judge_server = FakeJudgeServer(echoing_judge)
    yield judge_server
    judge_server.close()


@pytest.fixture
def secret_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def openai_judge(server: FakeJudgeServer, cache_dir: Path | None = None, **options) -> LLMJudgeScorer:
    return judge_server.openai_judge(server, cache_dir, **{"api_key_env": KEY_ENV, **options})


# -- the scorer on its own -----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 200])
def test_error_bodies_echoing_the_key_at_any_offset_leave_no_piece_of_it(server, secret_key, status):
    offsets = list(range(0, 160, 7))

    def reply(body, headers):
        user = body["messages"][-1]["content"]
        offset = int(user.rsplit("response ", 1)[1])
        echoed = "e" * offset + f"your key {headers['Authorization']} is invalid"
        return status, echoed if status != 200 else f"not json: {echoed}"

    server.reply = reply
    judge = openai_judge(server, max_concurrency=4)
    scores = judge.score_group(CONTEXT, [f"response {offset}" for offset in offsets])
    assert all(isinstance(score, Failed) for score in scores)
    reasons = [score.reason for score in scores]
    expected = "not an OpenAI chat completion" if status == 200 else f"HTTP {status}"
    assert all(expected in reason for reason in reasons), reasons[:2]
    assert [leaks(reason) for reason in reasons] == [[]] * len(offsets)
    assert any("[api key]" in reason for reason in reasons)  # the key was there, and was redacted
    assert set(server.authorizations) == {f"Bearer {secret_key}"}  # the server did get it


def test_judge_outputs_errors_cache_and_logs_hold_no_key(server, secret_key, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # urllib3 and requests included
    cache = tmp_path / "cache"
    judge = openai_judge(server, cache, max_retries=1)
    responses = [f"answer number {i} " + "z" * i for i in range(24)]
    scores = judge.score_group(CONTEXT, responses)
    group = openai_judge(server, cache, mode="group").score_group(CONTEXT, responses[:3])
    assert len(server.authorizations) > len(responses)  # retries (503) included
    assert set(server.authorizations) == {f"Bearer {secret_key}"}
    assert any(isinstance(s, float) for s in scores) and any(isinstance(s, Failed) for s in scores)
    for score in [*scores, *group]:
        assert leaks(repr(score)) == []
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and all(leaks(p.read_bytes()) == [] for p in cached)
    assert any("[api key]" in p.read_text() for p in cached)  # the echo was cached, redacted
    logged = [record.getMessage() for record in caplog.records] + [repr(record.args) for record in caplog.records]
    assert leaks("\n".join(logged)) == []
    out, err = capfd.readouterr()
    assert leaks(out + err) == []


def test_the_key_is_read_from_the_environment_and_never_shown(server, secret_key, monkeypatch, tmp_path):
    judge = openai_judge(server)
    for shown in (
        repr(judge),
        str(judge),
        repr(judge.backend),
        repr(vars(judge)),
        repr(vars(judge.backend)),
        repr(judge.backend._api_key),
        f"{judge.backend._api_key}",
    ):
        assert leaks(shown) == [], shown
    # The settings hold the variable's name, never its value.
    options = {"backend": "openai", "base_url": server.base_url, "model": "judge-test", "api_key_env": KEY_ENV}
    settings = ScoringSettings(scorers={"default": {"llm_judge": 1.0}}, options={"llm_judge": options})
    built = build_named_scorer("llm_judge", settings, cache_dir=tmp_path)
    assert built.score_group(CONTEXT, ["abc"]) and server.authorizations[-1] == f"Bearer {secret_key}"
    for shown in (repr(settings), settings.model_dump_json(), repr(built), repr(vars(built.backend))):
        assert leaks(shown) == [] and KEY_ENV in repr(settings)
    # A key put in the options instead is refused, and the refusal does not repeat it.
    inline = ScoringSettings(options={"llm_judge": {**options, "api_key": SECRET}})
    with pytest.raises(ValueError, match="api_key") as refused:
        build_named_scorer("llm_judge", inline, cache_dir=tmp_path)
    assert leaks(str(refused.value)) == [] and leaks(repr(refused.value)) == []
    # A variable that is unset, or holds something no header can carry, is named; its value is not.
    monkeypatch.setenv(KEY_ENV, f"{SECRET}\u00e9")
    with pytest.raises(ValueError, match=KEY_ENV) as unusable:
        openai_judge(server)
    assert leaks(str(unusable.value)) == []
    monkeypatch.setenv(KEY_ENV, f"  {SECRET}\n")  # read from a secrets file with its newline
    openai_judge(server).score_group(CONTEXT, ["abcd"])
    assert server.authorizations[-1] == f"Bearer {SECRET}"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        openai_judge(server)


# -- a whole round through Dagster ---------------------------------------------------------


def file_texts(path: Path) -> list[str | bytes]:
    """What a file holds, decoded where its format compresses or encodes text (Parquet, DuckDB, SQLite, gzip)."""
    raw = path.read_bytes()
    texts: list[str | bytes] = [raw]
    if raw[:2] == b"\x1f\x8b":
        texts.append(gzip.decompress(raw))
    if path.suffix == ".parquet":
        texts.append(repr(pq.read_table(path).to_pylist()))
    elif path.suffix == ".duckdb":
        with duckdb.connect(str(path), read_only=True) as con:
            for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
                texts.append(repr(con.execute(f'SELECT * FROM "{table}"').fetchall()))
    elif raw[:16] == b"SQLite format 3\x00":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                texts.append(repr(con.execute(f'SELECT * FROM "{table}"').fetchall()))
    return texts


def test_a_round_with_an_api_key_judge_leaks_it_nowhere(
    server, secret_key, tmp_path, tiny_model_dir, monkeypatch, caplog, capfd
):
    import dagster as dg

    from tao_pipeline.cli.runner import run_round

    caplog.set_level(logging.DEBUG)
    config = write_tiny_config(tmp_path, tiny_model_dir)
    config.write_text(
        config.read_text()
        + f"""
[scoring]
max_unscored_share = 0.9  # the fake judge fails half its requests on purpose (by a hash of the text)

[scoring.scorers]
default = {{ llm_judge = 1.0 }}
short_answer = {{ self_consistency = 1.0, llm_judge = 1.0 }}
arithmetic = {{ self_consistency = 1.0, llm_judge = 1.0 }}

[scoring.options.llm_judge]
backend = "openai"
base_url = "{server.base_url}"
model = "judge-test"
api_key_env = "{KEY_ENV}"
max_retries = 1
timeout_s = 10
"""
    )
    settings = load_settings(config)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))  # restored after the test
    echoed: list[str] = []
    report = run_round(str(config), echo=echoed.append)
    assert report.completed, report

    # The judge was really used, with the key, by the round (scores) and its evaluation.
    assert len(server.authorizations) > 20 and set(server.authorizations) == {f"Bearer {secret_key}"}
    scores = pq.read_table(settings.lake_dir / "response_scores" / "round-0001.parquet").to_pandas()
    assert scores["score_parts"].str.contains("llm_judge").all()
    failures = scores["failures"].dropna()
    assert failures.str.contains("HTTP 401").any() and failures.str.contains("api key").any()

    # Nowhere under the home folder: lake, catalog, judge cache, registry, checkpoints, Dagster instance.
    files = [p for p in settings.home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "registry.duckdb" for p in files)
    assert any("judge" in p.parts for p in files), "the judge cache was written"
    assert any(p.suffix == ".db" for p in files if "dagster" in p.parts), "the Dagster event log was written"
    leaked = {str(p): found for p in files for text in file_texts(p) if (found := leaks(text))}
    assert leaked == {}

    # Nor in the Dagster event log as Dagster reads it back: messages, metadata, errors.
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    runs = instance.get_runs()
    assert len(runs) >= 2  # the ingest and the round
    for run in runs:
        for entry in instance.all_logs(run.run_id):
            assert leaks(repr(entry)) == [], entry.message
        assert leaks(repr(run.run_config)) == [] and leaks(repr(run.tags)) == []
    scored = instance.get_latest_materialization_event(dg.AssetKey("response_scores"))
    assert scored is not None and leaks(repr(scored.asset_materialization.metadata)) == []

    # Nor printed, echoed or logged, nor in the settings or the scorer the round built.
    out, err = capfd.readouterr()
    assert leaks(out + err) == []
    assert leaks("\n".join(echoed)) == []
    assert leaks("\n".join(r.getMessage() + repr(r.args) for r in caplog.records)) == []
    assert leaks(repr(settings)) == [] and leaks(settings.model_dump_json()) == []

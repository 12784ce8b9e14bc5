"""API keys for endpoints come from environment variables and never appear in logs, metadata or the lake.

A hostile OpenAI-compatible server on 127.0.0.1 echoes the Authorization header back everywhere
it can, in every form it might take: as is, in other letter case, JSON-escaped (\\/, \\u with
either case of hex), percent-encoded (upper or lower case, '+' for the space), HTML-escaped (named
or numeric), base64, base32, hex, and cut in the middle. It does so in the judge's text, in
400/401/403/404/422/429/5xx error bodies, in non-JSON and HTML bodies, in the usage block, and
to the generation backend as well. Nothing is redacted: what is recorded of an endpoint is a
classified failure (a kind, the HTTP status, a fixed message) or a parsed verdict, so no form
of the key can get through. A whole round runs through Dagster with that judge; then every file
under the home folder (lake, judge cache, registry, checkpoints, the Dagster instance's event
log and compute logs), everything printed or logged, every Failed reason and the repr of the
scorer and settings are searched for any piece of the key, in any of those forms.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import logging
import re
import sqlite3
import urllib.parse
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tao_pipeline.common.endpoints import STATUS_MESSAGES, EndpointFailure
from tao_pipeline.generation import SamplingParams
from tao_pipeline.generation.openai_backend import EndpointError, OpenAIGenerator
from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.judge import NO_SCORE_LINE, NOT_SCORES_JSON, LLMJudgeScorer
from tao_pipeline.settings import ScoringSettings, load_settings
from tests import judge_server
from tests.helpers import write_tiny_config
from tests.judge_server import FakeJudgeServer, chat_completion

KEY_ENV = "TAO_SECRETS_TEST_JUDGE_KEY"
# '/', '+' and '\\' change under JSON, URL and HTML escaping: the key must not survive any of them.
SECRET = "sk-tao-Zq8w/XvR2+mKp5\\LtN9bYc3HdJ7fGs4Wq6E"


def _percent_lower(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def encodings(text: str) -> dict[str, str]:
    """The forms a server may echo a header in."""
    raw = text.encode()
    quoted = urllib.parse.quote(text, safe="")
    return {
        "raw": text,
        "upper": text.upper(),
        "lower": text.lower(),
        "json": json.dumps(text)[1:-1],
        "json-slash": json.dumps(text)[1:-1].replace("/", "\\/"),
        "unicode": "".join(f"\\u{ord(c):04x}" for c in text),
        "unicode-upper": "".join(f"\\u{ord(c):04X}" for c in text),
        "url": quoted,
        "url-lower": _percent_lower(quoted),
        "url-plus": urllib.parse.quote_plus(text),
        "url-every-byte": "".join(f"%{byte:02x}" for byte in raw),
        "html": html.escape(text),
        "html-numeric": "".join(f"&#x{ord(c):x};" for c in text),
        "html-decimal": "".join(f"&#{ord(c)};" for c in text),
        "backslashes": text.replace("\\", "\\\\"),
        "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode(),
        "base32": base64.b32encode(raw).decode(),
        "base32-lower": base64.b32encode(raw).decode().lower(),
        "hex": raw.hex(),
        "hex-upper": raw.hex().upper(),
        "first-half": text[: len(text) // 2],
        "second-half": text[len(text) // 2 :],
    }


FORMS = sorted(encodings(SECRET))


def _windows(form: str, size: int, skip: int = 0, cut: int = 0) -> set[str]:
    form = form[skip : len(form) - cut]
    return {form[i : i + size].lower() for i in range(len(form) - size + 1)}


def _key_pieces(key: str) -> list[str]:
    """Pieces that only a leak of the key can produce, lower-cased (the search ignores case): 10 characters
    in a row of the key in a character-for-character form, and as many characters of encoded forms as
    encode about 8 of the key's bytes, at every alignment the key can have inside a longer encoded text."""
    raw = key.encode()
    pieces: set[str] = set()
    for name in ("raw", "json", "json-slash", "url", "url-plus", "html", "backslashes"):
        pieces |= _windows(encodings(key)[name], 10)
    for name in ("unicode", "html-numeric", "html-decimal"):  # 4 to 6 characters per character of the key
        pieces |= _windows(encodings(key)[name], 40)
    pieces |= _windows(encodings(key)["url-every-byte"], 3 * 8) | _windows(raw.hex(), 16)
    for offset in range(3):  # base64: the key's bytes start 0, 1 or 2 bytes into a 3-byte group
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            pieces |= _windows(encode(b"\0" * offset + raw).decode(), 11, skip=4, cut=4)
    for offset in range(5):  # base32: 0..4 bytes into a 5-byte group
        pieces |= _windows(base64.b32encode(b"\0" * offset + raw).decode(), 13, skip=8, cut=8)
    return sorted(pieces)


PIECES = _key_pieces(SECRET)
CONTEXT = PromptContext("Name a colour. Answer with one word.", "short_answer", "You are a concise assistant.")


def _searches(pieces: list[str]) -> list[tuple[re.Pattern, int, set[str]]]:
    """Per piece length: a pattern for runs of the characters such pieces are made of, and the pieces. Only
    those runs need looking at, so a file is searched in one pass per length, not once per piece."""
    by_length: dict[int, set[str]] = {}
    for piece in pieces:
        by_length.setdefault(len(piece), set()).add(piece)
    searches = []
    for length, group in sorted(by_length.items()):
        alphabet = "".join(sorted({char for piece in group for char in piece}))
        searches.append((re.compile(f"[{re.escape(alphabet)}]{{{length},}}"), length, group))
    return searches


SEARCHES = _searches(PIECES)


def leaks(text: str | bytes) -> list[str]:
    """The pieces of the key found in text, in any letter case (bytes are searched as UTF-8 and UTF-16)."""
    if isinstance(text, bytes):
        decoded = [text.decode("latin-1"), text.decode("utf-16-le", "ignore"), text[1:].decode("utf-16-le", "ignore")]
        return sorted(set().union(*(leaks(each) for each in decoded)))
    lowered, found = text.lower(), set()
    for pattern, length, pieces in SEARCHES:
        for run in pattern.finditer(lowered):
            chunk = run.group()
            found.update(piece for i in range(len(chunk) - length + 1) if (piece := chunk[i : i + length]) in pieces)
    return sorted(found)


def test_the_leak_search_finds_every_form_and_half_of_the_key():
    for name, form in encodings("Bearer " + SECRET).items():
        assert leaks(f"an error: {form} (request 7)"), name
        assert leaks(f"an error: {form} (request 7)".encode("utf-16-le")), name
    assert leaks("nothing here, 401 Unauthorized, Bearer [redacted]") == []


# -- a judge that echoes the key back --------------------------------------------------------

ECHO_STATUSES = (400, 401, 403, 404, 422, 429, 500, 502, 503)


def echoing_judge(body: dict, headers: dict) -> tuple[int, str]:
    """Deterministic by request: mostly a score with the header echoed in the text, sometimes an error echoing
    it, each time in another of its forms."""
    authorization = headers.get("Authorization", "<none>")
    user = body["messages"][-1]["content"]
    digest = int(hashlib.sha256(user.encode()).hexdigest(), 16)
    form = encodings(authorization)[FORMS[digest % len(FORMS)]]
    kind = (digest // len(FORMS)) % 8
    if kind == 0:
        return 401, json.dumps({"error": {"message": f"Incorrect API key provided: {form}", "code": 3}})
    if kind == 1:
        return 200, f"<html><body>upstream proxy saw {form}</body></html>"  # not JSON
    if kind == 2:
        return 503, f"overloaded, retry later ({form})"
    if kind == 3:
        return 200, chat_completion(f"Saw {form}. Score: 5")  # a score in prose: no verdict
    score = 1 + len(user) % 10
    return 200, chat_completion(f"Request carried {form}.\nScore: {score}")


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

EXPECTED_REASON = {status: f"llm_judge: HTTP {status} ({STATUS_MESSAGES[status]})" for status in ECHO_STATUSES}
EXPECTED_REASON[200] = "llm_judge: invalid: the answer is not an OpenAI chat completion"


@pytest.mark.parametrize("status", [*ECHO_STATUSES, 200])
def test_error_bodies_echoing_the_key_in_any_form_give_only_a_classified_reason(server, secret_key, status):
    """Every form of the key, at offsets around where an excerpt would have been cut: the reason is the
    same fixed line whatever the body holds."""

    def reply(body, headers):
        user = body["messages"][-1]["content"]
        form, offset = user.rsplit("response ", 1)[1].split(":")
        echoed = "e" * int(offset) + f"your key {encodings(headers['Authorization'])[form]} is invalid"
        return status, echoed if status != 200 else f"<!DOCTYPE html><p>{echoed}</p>"

    server.reply = reply
    judge = openai_judge(server, max_concurrency=4)
    responses = [f"response {form}:{offset}" for form in FORMS for offset in (0, 57, 113)]
    scores = judge.score_group(CONTEXT, responses)
    assert scores == [Failed(EXPECTED_REASON[status])] * len(responses)
    assert set(server.authorizations) == {f"Bearer {secret_key}"}  # the server did get it


@pytest.mark.parametrize("form", FORMS)
def test_a_judge_echoing_the_key_in_its_answer_records_only_the_verdict(server, secret_key, tmp_path, form):
    cache = tmp_path / "cache"

    def reply(body, headers):
        echoed = encodings(headers["Authorization"])[form]
        if "candidate responses" in body["messages"][0]["content"]:  # group: the score field and a key echo
            return 200, chat_completion(json.dumps({"scores": [3, 9], "debug": echoed}))
        if "second" in body["messages"][-1]["content"]:
            return 200, chat_completion(f"I saw {echoed} and cannot judge this.")  # no verdict
        usage = {"prompt_tokens": echoed, "completion_tokens": echoed}  # junk where numbers go
        completion = json.loads(chat_completion(f"The request carried {echoed}.\nScore: 8")) | {"usage": usage}
        return 200, json.dumps(completion)

    server.reply = reply
    scores = openai_judge(server, cache).score_group(CONTEXT, ["first answer", "second answer"])
    assert scores == [pytest.approx(7 / 9), Failed(NO_SCORE_LINE)]
    group = openai_judge(server, cache, mode="group").score_group(CONTEXT, ["first answer", "second answer"])
    assert group == [Failed(NOT_SCORES_JSON)] * 2  # an extra key: not the required format
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert all(leaks(p.read_bytes()) == [] for p in files)
    verdicts = sorted(json.dumps(json.loads(p.read_text())) for p in files)  # the verdicts, and nothing else
    expected = [{"verdict": [7 / 9]}, {"verdict": [NO_SCORE_LINE]}, {"verdict": [NOT_SCORES_JSON] * 2}]
    assert verdicts == sorted(json.dumps(entry) for entry in expected)


def test_judge_outputs_errors_cache_and_logs_hold_no_key(server, secret_key, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # urllib3, httpx and the openai client included
    cache = tmp_path / "cache"
    judge = openai_judge(server, cache, max_retries=1)
    responses = [f"answer number {i} " + "z" * i for i in range(48)]
    scores = judge.score_group(CONTEXT, responses)
    group = openai_judge(server, cache, mode="group").score_group(CONTEXT, responses[:3])
    assert len(server.authorizations) > len(responses)  # retries (503) included
    assert set(server.authorizations) == {f"Bearer {secret_key}"}
    assert any(isinstance(s, float) for s in scores) and any(isinstance(s, Failed) for s in scores)
    for score in [*scores, *group]:
        assert leaks(repr(score)) == []
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and all(leaks(p.read_bytes()) == [] for p in cached)
    logged = [record.getMessage() for record in caplog.records] + [repr(record.args) for record in caplog.records]
    assert leaks("\n".join(logged)) == []
    out, err = capfd.readouterr()
    assert leaks(out + err) == []


def test_failures_are_classified_from_a_fixed_set():
    assert str(EndpointFailure("http", 401)) == "HTTP 401 (unauthorized: check the API key)"
    assert str(EndpointFailure("http", 418)) == "HTTP 418 (client error)"
    assert str(EndpointFailure("http", 599)) == "HTTP 599 (server error)"
    assert str(EndpointFailure("timeout", timeout_s=2.5)) == "timeout: no complete answer within 2.5s"
    assert EndpointFailure("http", 503).retryable and not EndpointFailure("http", 401).retryable
    assert EndpointFailure("connection").retryable and not EndpointFailure("invalid").retryable


# -- the generation backend, against the same kind of server --------------------------------------

MODELS = '{"object": "list", "data": [{"id": "v1", "object": "model", "owned_by": "x"}]}'


@pytest.mark.parametrize("form", ["raw", "url-lower", "base32", "json-slash", "first-half", "upper"])
def test_generation_errors_hold_no_key(tiny_model_dir, secret_key, monkeypatch, caplog, form):
    caplog.set_level(logging.DEBUG)
    statuses = iter([503, 400])

    def reply(body, headers):
        echoed = encodings(headers["Authorization"])[form]
        if body is None:
            return 200, MODELS
        return next(statuses, 500), json.dumps({"error": {"message": f"bad key {echoed}", "code": 3}})

    fake = FakeJudgeServer(reply)
    try:
        generator = OpenAIGenerator(tiny_model_dir, "v1", base_url=fake.base_url, api_key_env=KEY_ENV, max_retries=2)
        prompts = pd.DataFrame({"prompt_id": ["p1"], "prompt": ["Hi"], "system": [None]})
        with pytest.raises(EndpointError) as refused:  # a 503, retried, then a 400
            generator.generate(prompts, SamplingParams(1, 4), progress=False)
        assert str(refused.value).endswith("refused prompt p1: HTTP 400 (bad request)")

        fake.reply = lambda body, headers: (401, f"<html>{encodings(headers['Authorization'])[form]}</html>")
        with pytest.raises(EndpointError) as unlisted:
            OpenAIGenerator(tiny_model_dir, "v1", base_url=fake.base_url, api_key_env=KEY_ENV)
        assert str(unlisted.value).endswith("cannot list the models of " + fake.base_url + ": HTTP 401 "
                                            "(unauthorized: check the API key)")  # fmt: skip
    finally:
        fake.close()
    for error in (refused.value, unlisted.value):  # nor any error chained to it, shown in a traceback or not
        chain = []
        while error is not None:
            chain.append(error)
            error = error.__cause__ or error.__context__
        assert [leaks(repr(each)) for each in chain] == [[]] * len(chain)
    assert leaks("\n".join(r.getMessage() + repr(r.args) for r in caplog.records)) == []


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


@pytest.mark.slow  # a whole round through Dagster, about a minute
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
    assert failures.str.contains("HTTP 401 (unauthorized: check the API key)", regex=False).any()
    assert failures.str.contains("no verdict").any()

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

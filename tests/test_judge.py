"""tao_pipeline.scoring.judge: a real OpenAI-compatible HTTP server on 127.0.0.1, and the tiny local llama."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from tao_pipeline.registry import ModelNotFoundError
from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import build_named_scorer
from tao_pipeline.scoring.judge import LLMJudgeScorer, parse_group, parse_pointwise
from tao_pipeline.settings import ScoringSettings
from tests.judge_server import FakeJudgeServer, chat_completion, openai_judge

KEY_ENV = "TAO_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789-secret"
CONTEXT = PromptContext("Name a colour. Answer with one word.", "short_answer", "You are a concise assistant.")


def length_score(text: str) -> int:
    """The test server's verdict: one point per character, clamped to 1..10."""
    return max(1, min(10, len(text)))


def score_by_length(body: dict, headers: dict) -> tuple[int, str]:
    """Answers like a judge would, deterministically from the request: pointwise or group by the system text."""
    system, user = (m["content"] for m in body["messages"])
    if "candidate responses" in system:
        candidates = re.findall(r"\[Candidate \d+\]\n(.*?)(?=\n\n\[Candidate \d+\]\n|\Z)", user, re.S)
        return 200, chat_completion('```json\n{"scores": %s}\n```' % [length_score(c) for c in candidates])
    response = user.split("[Assistant response]\n", 1)[1]
    return 200, chat_completion(f"It answers the prompt.\nScore: {length_score(response)}")


@pytest.fixture
def server():
    judge_server = FakeJudgeServer(score_by_length)
    yield judge_server
    judge_server.close()


@pytest.fixture
def secret_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def reasons(scores) -> list[str]:
    return [s.reason for s in scores if isinstance(s, Failed)]


# -- openai backend -------------------------------------------------------------------------


def test_pointwise_scores_come_from_the_server(server):
    judge = openai_judge(server, max_new_tokens=64)
    responses = ["a", "abcd", "x" * 20]
    assert judge.score_group(CONTEXT, responses) == pytest.approx([0.0, 3 / 9, 1.0])
    assert len(server.requests) == 3
    body, _ = server.requests[0]
    assert body["model"] == "judge-test" and body["max_tokens"] == 64 and body["temperature"] == 0.0
    system, user = body["messages"]
    assert system["role"] == "system" and "\nScore: N\n" in system["content"]
    assert "nothing after it" in system["content"] and "any other form is discarded" in system["content"]
    assert CONTEXT.prompt in user["content"] and CONTEXT.system in user["content"]


def test_group_mode_sends_all_candidates_in_one_request(server):
    judge = openai_judge(server, mode="group")
    responses = ["Blue", "Green\n\nwith a second paragraph", "r"]
    assert judge.score_group(CONTEXT, responses) == pytest.approx([3 / 9, 1.0, 0.0])
    assert len(server.requests) == 1
    system = server.requests[0][0]["messages"][0]["content"]
    assert '{"scores": [<score 1>, <score 2>, <score 3>]}' in system and "nothing else" in system
    user = server.requests[0][0]["messages"][1]["content"]
    assert [f"[Candidate {i}]" in user for i in (1, 2, 3)] == [True, True, True]


def test_group_reply_of_the_wrong_length_fails_the_whole_group(server):
    server.reply = lambda body, headers: (200, chat_completion('{"scores": [7, 8]}'))
    scores = openai_judge(server, mode="group").score_group(CONTEXT, ["a", "b", "c"])
    assert all(isinstance(s, Failed) and "no verdict: 2 scores for 3 responses" in s.reason for s in scores)


def test_unparsable_pointwise_reply_is_failed(server):
    server.reply = lambda body, headers: (200, chat_completion("I would rather not say."))
    scores = openai_judge(server).score_group(CONTEXT, ["a", "b"])
    assert all(isinstance(s, Failed) and "no verdict" in s.reason for s in scores)


def test_key_travels_in_the_header_only(server, secret_key, tmp_path):
    # A hostile server echoes the Authorization header back in the judge's text and in an error body.
    def echo(body, headers):
        if "bad" in body["messages"][1]["content"]:
            return 400, f"rejected {headers['Authorization']}"
        return 200, chat_completion(f"You sent {headers['Authorization']}.\nScore: 7")

    server.reply = echo
    judge = openai_judge(server, tmp_path / "cache", api_key_env=KEY_ENV)
    scores = judge.score_group(CONTEXT, ["good", "bad"])
    assert scores[0] == pytest.approx(6 / 9)
    assert isinstance(scores[1], Failed) and scores[1].reason == "llm_judge: HTTP 400 (bad request)"
    assert {headers["Authorization"] for _, headers in server.requests} == {f"Bearer {secret_key}"}
    files = cache_files(tmp_path / "cache")
    assert len(files) == 1  # only the answered call is cached, and only its verdict
    assert [json.loads(f.read_text()) for f in files] == [{"verdict": [6 / 9]}]
    assert secret_key not in repr(judge.backend)


def test_cache_answers_without_a_request(server, tmp_path):
    cache_dir = tmp_path / "cache"
    responses = ["Blue", "Green"]
    first = openai_judge(server, cache_dir).score_group(CONTEXT, responses)
    assert len(server.requests) == 2 and len(cache_files(cache_dir)) == 2
    again = openai_judge(server, cache_dir).score_group(CONTEXT, responses)
    assert again == first and len(server.requests) == 2
    assert not [p for p in cache_files(cache_dir) if p.suffix == ".tmp"]
    openai_judge(server, cache_dir, rubric="Prefer shorter answers.").score_group(CONTEXT, responses)
    assert len(server.requests) == 4  # a new rubric is a new key
    openai_judge(server, cache_dir, mode="group").score_group(CONTEXT, responses)
    assert len(server.requests) == 5 and len(cache_files(cache_dir)) == 5


def test_garbage_reply_is_failed_and_not_cached(server, tmp_path):
    server.reply = lambda body, headers: (200, "<html>this is not json</html>")
    judge = openai_judge(server, tmp_path / "cache")
    scores = judge.score_group(CONTEXT, ["a"])
    assert scores == [Failed("llm_judge: invalid: the answer is not an OpenAI chat completion")]
    server.reply = lambda body, headers: (200, json.dumps({"choices": []}))
    assert "not an OpenAI chat completion" in reasons(judge.score_group(CONTEXT, ["a"]))[0]
    server.reply = score_by_length
    assert judge.score_group(CONTEXT, ["a"]) == [0.0]
    assert len(server.requests) == 3


def test_http_500_is_retried_a_bounded_number_of_times(server):
    server.reply = lambda body, headers: (500, '{"error": "overloaded"}')
    scores = openai_judge(server, max_retries=1).score_group(CONTEXT, ["a"])
    assert scores == [Failed("llm_judge: HTTP 500 (server error)")]
    assert len(server.requests) == 2


def test_http_500_then_success_recovers(server):
    def flaky(body, headers):
        return (500, "{}") if len(server.requests) == 1 else score_by_length(body, headers)

    server.reply = flaky
    assert openai_judge(server, max_retries=2).score_group(CONTEXT, ["abcd"]) == pytest.approx([3 / 9])
    assert len(server.requests) == 2


def test_a_slow_server_times_out(server):
    def slow(body, headers):
        time.sleep(1.5)
        return score_by_length(body, headers)

    server.reply = slow
    started = time.perf_counter()
    scores = openai_judge(server, timeout_s=0.3).score_group(CONTEXT, ["a"])
    assert time.perf_counter() - started < 1.4
    assert isinstance(scores[0], Failed) and "timeout" in scores[0].reason


def test_an_unreachable_server_is_failed():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LLMJudgeScorer(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    assert reasons(judge.score_group(CONTEXT, ["a"])) == [
        "llm_judge: connection: could not connect, or the connection dropped"
    ]


def test_options_are_checked_and_the_key_is_never_an_option(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="api_key_env"):
        LLMJudgeScorer(backend="openai", base_url="http://127.0.0.1:1/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="base_url"):
        LLMJudgeScorer(backend="openai", model="m")
    with pytest.raises(ValueError, match="mode"):
        LLMJudgeScorer(backend="openai", base_url="http://127.0.0.1:1/v1", model="m", mode="pairwise")
    options = {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    settings = ScoringSettings(options={"llm_judge": {**options, "api_key": "sk-inline"}})
    with pytest.raises(ValueError, match=r"scoring\.options\.llm_judge.*api_key"):
        build_named_scorer("llm_judge", settings, cache_dir=tmp_path)
    built = build_named_scorer("llm_judge", ScoringSettings(options={"llm_judge": options}), cache_dir=tmp_path)
    assert built.cache.directory == tmp_path / "judge"


# -- parsing (the neighbours of each format: tests/test_real_verdicts.py) ------------------------


@pytest.mark.parametrize(
    "output, expected",
    [
        ("Score: 8", 7 / 9),
        ("It answers the prompt.\nScore: 1", 0.0),
        ("Clear and correct.\n\nScore: 10\n\n", 1.0),
        ("Good.\nscore:7", 6 / 9),
    ],
)
def test_parse_pointwise(output, expected):
    assert parse_pointwise(output) == pytest.approx(expected)


@pytest.mark.parametrize(
    "output", ["", "no number", "Score: 11", "Score: 0", "Score: 7.5", "Score: 8/10", "10", "7 out of 10"]
)
def test_parse_pointwise_failures(output):
    assert isinstance(parse_pointwise(output), Failed)


@pytest.mark.parametrize(
    "output",
    [
        '{"scores": [1, 10, 4]}',
        '```json\n{"scores": [1, 10, 4]}\n```',
        '  {"scores": [1,10,4]}\n',
    ],
)
def test_parse_group(output):
    assert parse_group(output, 3) == pytest.approx([0.0, 1.0, 3 / 9])


@pytest.mark.parametrize(
    "output",
    [
        '{"scores": [1, 10]}',
        '{"scores": [1, true, 4]}',
        '{"scores": [1, 11, 4]}',
        '{"scores": [1, "high", 4]}',
        "scores: 1, 10, 4",
        '{"scores": [1, 10,',
        "[1, 10, 4]",
        'Here you go:\n```json\n{"scores": [1, 10, 4]}\n```',
        '{"reasoning": "x", "scores": [1, 10, 4]}',
    ],
)
def test_parse_group_failures(output):
    scores = parse_group(output, 3)
    assert len(scores) == 3 and all(isinstance(s, Failed) for s in scores)


# -- transformers backend -------------------------------------------------------------------


def local_judge(model_dir: Path, cache_dir: Path, **options) -> LLMJudgeScorer:
    return LLMJudgeScorer(
        backend="transformers",
        model=str(model_dir),
        cache_dir=str(cache_dir),
        max_new_tokens=8,
        dtype="float32",
        **options,
    )


def test_local_gibberish_judge_fails_the_group_and_caches(tiny_model_dir, tmp_path):
    responses = ["Blue", "Green", "Red"]
    scores = local_judge(tiny_model_dir, tmp_path / "cache", mode="group").score_group(CONTEXT, responses)
    assert len(scores) == 3 and all(isinstance(s, Failed) and "no verdict" in s.reason for s in scores)
    assert len(cache_files(tmp_path / "cache")) == 1
    cached = local_judge(tiny_model_dir, tmp_path / "cache", mode="group")
    assert cached.score_group(CONTEXT, responses) == scores
    assert cached.backend._generator is None  # answered from the cache: the model was never loaded


def test_local_pointwise_judge_never_raises(tiny_model_dir, tmp_path):
    responses = ["Blue", "Green", "Red"]
    scores = local_judge(tiny_model_dir, tmp_path / "cache").score_group(CONTEXT, responses)
    assert len(scores) == 3
    assert all(isinstance(s, Failed) or 0.0 <= s <= 1.0 for s in scores)
    assert len(cache_files(tmp_path / "cache")) == 3


def test_local_judge_prompt_too_long_is_failed(tiny_model_dir, tmp_path):
    scores = local_judge(tiny_model_dir, tmp_path / "cache", max_prompt_tokens=16).score_group(CONTEXT, ["Blue"])
    assert "max_prompt_tokens" in scores[0].reason
    assert cache_files(tmp_path / "cache") == []


def test_missing_local_judge_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"scoring\.options\.llm_judge\.model"):
        LLMJudgeScorer(backend="transformers", model=str(tmp_path / "missing"))


@pytest.mark.parametrize("status", [200, 500])
def test_a_server_trickling_its_answer_is_abandoned_at_the_deadline(server, status):
    """One byte every 0.1 s: every read succeeds, so only a total deadline stops it (was 25 s for 1 s)."""
    server.reply = lambda body, headers: (status, chat_completion("Score: 7") + " " * 400, 0.1)
    started = time.perf_counter()
    scores = openai_judge(server, timeout_s=1.0, max_retries=2).score_group(CONTEXT, ["a"])
    assert time.perf_counter() - started < 2.5
    assert scores == [Failed("llm_judge: timeout: no complete answer within 1s")]

"""`tao serve`'s request log under faults: replicas sharing one inbox (all in this process, so all with the same
pid, like containers that are each pid 1), renames and writes that fail, a killed writer, and hostile
`.partial` entries (links, hard links, folders, FIFOs) that recovery must leave alone."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from click.testing import CliRunner

from tao_pipeline.cli import main
from tao_pipeline.data.lake import Lake
from tao_pipeline.serving import request_log as request_log_module
from tao_pipeline.serving.request_log import RequestLog
from tests.serve_helpers import jsonl_lines, load, running_server, serve_config

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def served_files(inbox: Path) -> list[Path]:
    return sorted(inbox.glob("serve-*.jsonl"))


def rows_in(inbox: Path) -> list[dict]:
    return [json.loads(line) for path in served_files(inbox) for line in jsonl_lines(path)]


def ingest(config: Path) -> int:
    """Rows of served traffic in the lake after `tao ingest`."""
    result = CliRunner().invoke(main, ["ingest", "--config", str(config), "--set", "flywheel.settle_seconds=0"])
    assert result.exit_code == 0, result.output
    settings = load(config)
    lake = Lake(settings.lake_dir)
    logs = lake.sql(f"SELECT external_id FROM {lake.scan('usage_logs')}")
    return int(logs["external_id"].str.startswith(("chatcmpl-", "cmpl-")).sum())


@pytest.mark.parametrize("replicas", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_replicas_on_one_inbox_lose_and_duplicate_nothing(tmp_path, tiny_model_dir, replicas):
    """Replicas in one process (one pid for all, like containers that are each pid 1) write into one inbox under
    concurrent traffic, files rolling every 3 rows, and are replaced one by one while the others keep serving (a
    rolling update: each new one recovers files at start while the others write). Every answer is logged exactly
    once (and, with 3 replicas, ingested exactly once)."""
    config = serve_config(tmp_path, tiny_model_dir, "log_roll_rows = 3")
    settings = load(config)
    live: dict[int, tuple] = {}  # slot -> (context manager, server, requests in flight)
    answered, lock, stop, names = [], threading.Lock(), threading.Event(), set()

    def start(slot: int) -> None:
        manager = running_server(settings)
        server = manager.__enter__()
        names.add(server.app.state.request_log.instance)
        live[slot] = (manager, server, [0])

    def traffic(worker: int) -> None:
        clients: dict[str, openai.OpenAI] = {}
        i = 0
        while not stop.is_set():
            with lock:
                slots = sorted(live)
                if not slots:
                    continue
                _, server, in_flight = live[slots[(worker + i) % len(slots)]]
                in_flight[0] += 1
            try:
                client = clients.setdefault(server.url, openai.OpenAI(base_url=server.url, api_key="n", max_retries=0))
                messages = [{"role": "user", "content": f"worker {worker} request {i}"}]
                client.chat.completions.create(model="tao", messages=messages, max_tokens=3)
                with lock:
                    answered.append(1)
            finally:
                with lock:
                    in_flight[0] -= 1
            i += 1

    for slot in range(replicas):
        start(slot)
    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(traffic, worker) for worker in range(4)]
        time.sleep(0.3)
        for slot in range(replicas):
            with lock:
                manager, server, in_flight = live.pop(slot)  # no new requests go to it
            while in_flight[0]:
                time.sleep(0.01)
            health = requests.get(server.root + "/health", timeout=10).json()["request_log"]
            assert health["status"] == "ok" and health["roll_errors"] == 0 and health["rows_lost"] == 0, health
            manager.__exit__(None, None, None)
            start(slot)  # recovers at start while the others write
            time.sleep(0.2)
        stop.set()
        for worker in workers:
            worker.result()
    for manager, _, _ in live.values():
        manager.__exit__(None, None, None)

    rows = rows_in(settings.inbox_dir)
    ids = [row["id"] for row in rows]
    assert len(answered) > 10 and len(ids) == len(answered) and len(set(ids)) == len(ids)
    assert not list(settings.inbox_dir.glob(".serve-*"))  # every file handed over
    instances = {path.name.split("-", 2)[2].rsplit("-", 1)[0] for path in served_files(settings.inbox_dir)}
    assert len(names) == replicas * 2 and instances <= names  # each server its own names, though all had one pid
    if replicas == 3:  # `tao ingest` takes ~20 s on a busy machine: the slow variant checks the lake too
        assert ingest(config) == len(answered)


class FaultyOs:
    """The os module as request_log sees it, with ``rename`` or ``write`` failing while told to."""

    def __init__(self):
        self.failing: set[str] = set()
        self.half_writes = 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def rename(self, *args, **kwargs):
        if "rename" in self.failing:
            raise OSError(errno.EIO, "Input/output error")
        return os.rename(*args, **kwargs)

    def write(self, fd, data):
        if "write" in self.failing:
            self.half_writes += 1
            os.write(fd, bytes(data[: len(data) // 2]))  # half a line reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


def test_failed_renames_are_retried_and_no_request_fails(tmp_path, tiny_model_dir, monkeypatch):
    faulty = FaultyOs()
    monkeypatch.setattr(request_log_module, "os", faulty)
    config = serve_config(tmp_path, tiny_model_dir, "log_roll_rows = 2")
    with running_server(load(config)) as running:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0)
        faulty.failing.add("rename")
        for _ in range(6):
            client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2)  # none fails
        health = requests.get(running.root + "/health", timeout=10).json()
        assert health["status"] == "degraded" and health["request_log"]["roll_errors"] >= 3
        assert health["request_log"]["waiting_files"] and "Input/output error" in health["request_log"]["last_error"]
        metrics = requests.get(running.root + "/metrics", timeout=10).text
        assert 'tao_serve_log_errors_total{kind="roll"}' in metrics
        assert not served_files(running.settings.inbox_dir)

        faulty.failing.clear()  # the fault passes: the roller hands the files over by itself
        deadline = time.monotonic() + 10
        while requests.get(running.root + "/health", timeout=10).json()["status"] != "ok":
            assert time.monotonic() < deadline, "the waiting files were never handed over"
            time.sleep(0.1)
        assert len(rows_in(running.settings.inbox_dir)) == 6
        client.chat.completions.create(model="tao", messages=CHAT, max_tokens=2)
    assert len(rows_in(running.settings.inbox_dir)) == 7


def test_a_full_disk_loses_only_the_row_being_written_and_leaves_no_half_line(tmp_path, monkeypatch):
    faulty = FaultyOs()
    monkeypatch.setattr(request_log_module, "os", faulty)
    log = RequestLog(tmp_path / "inbox", roll_rows=100, roll_seconds=3600)
    log.start()
    assert log.write({"id": "1", "prompt": "before"})
    faulty.failing.add("write")
    assert not log.write({"id": "2", "prompt": "lost"})
    faulty.failing.clear()
    assert log.write({"id": "3", "prompt": "after"})
    log.close()
    assert faulty.half_writes == 1
    assert [row["id"] for row in rows_in(tmp_path / "inbox")] == ["1", "3"]  # every line whole
    assert log.health.rows_lost == 1 and log.health.write_errors == 1 and log.health.ok


def test_a_partial_deleted_under_the_server_is_written_again(tmp_path):
    inbox = tmp_path / "inbox"
    log = RequestLog(inbox, roll_rows=100, roll_seconds=3600)
    log.start()
    for i in range(3):
        log.write({"id": str(i), "prompt": "p"})
    [partial] = inbox.glob(".serve-*.partial")
    partial.unlink()  # an operator's cleanup, a careless script
    log.close()
    assert [row["id"] for row in rows_in(inbox)] == ["0", "1", "2"]


def test_another_live_servers_partial_is_left_alone(tmp_path):
    inbox = tmp_path / "inbox"
    first = RequestLog(inbox, roll_rows=100, roll_seconds=3600)
    first.start()
    first.write({"id": "a", "prompt": "p"})
    second = RequestLog(inbox, roll_rows=100, roll_seconds=3600)
    assert second.start() == []  # same pid, but the first holds its file's lock
    second.write({"id": "b", "prompt": "p"})
    first.close()
    second.close()
    assert sorted(row["id"] for row in rows_in(inbox)) == ["a", "b"]
    assert first.instance != second.instance


def test_a_killed_writers_partial_is_recovered_without_its_cut_line(tmp_path):
    inbox = tmp_path / "inbox"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tao_pipeline.serving.request_log import RequestLog\n"
            f"log = RequestLog({str(inbox)!r}, roll_rows=100, roll_seconds=3600); log.start()\n"
            "for i in range(5): log.write({'id': str(i), 'prompt': 'p'})\n"
            "log._file and __import__('os').write(log._file.fd, b'{\"id\": \"cut')\n"
            "print('written', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "written"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
    finally:
        writer.kill()
    log = RequestLog(inbox)
    [recovered] = log.start()
    log.close()
    assert [json.loads(line)["id"] for line in jsonl_lines(recovered)] == ["0", "1", "2", "3", "4"]


def test_recovery_leaves_links_hard_links_folders_and_fifos_alone(tmp_path, tiny_model_dir):
    """At start-up: a symlink is not followed (its target is not truncated), a hard link to a file elsewhere is not
    ingested, a folder does not crash the server and a FIFO does not hang it; a real dead partial is recovered."""
    settings = load(serve_config(tmp_path, tiny_model_dir))
    inbox = settings.inbox_dir
    inbox.mkdir(parents=True)
    secrets_file = tmp_path / "secrets.txt"
    secrets_file.write_text("password=hunter2\nhalf a line")
    other = tmp_path / "elsewhere.jsonl"
    other.write_text('{"id": "x", "prompt": "not yours"}\n')
    (inbox / ".serve-h-1-aa-1.jsonl.partial").symlink_to(secrets_file)
    os.link(other, inbox / ".serve-h-1-bb-1.jsonl.partial")
    (inbox / ".serve-h-1-cc-1.jsonl.partial").mkdir()
    os.mkfifo(inbox / ".serve-h-1-dd-1.jsonl.partial")
    (inbox / ".serve-h-1-ee-1.jsonl.partial").write_text('{"id": "dead", "prompt": "p"}\n{"id": "cu')

    started = threading.Event()

    def serve() -> None:
        with running_server(settings) as running:
            started.set()
            health = requests.get(running.root + "/health", timeout=10).json()
            serve.health = health

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(60)
    assert started.is_set(), "tao serve did not start (a FIFO hung it?)"
    assert serve.health["request_log"]["entries_skipped"] == 4 and serve.health["request_log"]["files_recovered"] == 1
    assert secrets_file.read_text() == "password=hunter2\nhalf a line"
    assert (inbox / ".serve-h-1-aa-1.jsonl.partial").is_symlink()
    assert os.stat(other).st_nlink == 2 and (inbox / ".serve-h-1-cc-1.jsonl.partial").is_dir()
    assert [row["id"] for row in rows_in(inbox)] == ["dead"]


def test_an_answer_with_unicode_line_separators_is_logged_and_read_back_as_one_row(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped (they are not control characters), and a model may write
    them; `str.splitlines` would cut the logged line there. The log keeps one line per row, and ingestion (which
    ends lines at "\\n" only) reads it back whole."""
    from tao_pipeline.data.ingest import load_prompts
    from tao_pipeline.settings import DataSettings

    prompt, answer = "What is 2 + 2?\u2028Reply\x85briefly.", "4\u2029"
    log = RequestLog(tmp_path / "inbox", roll_rows=100, roll_seconds=3600)
    log.start()
    try:
        assert log.write(
            {
                "id": "chatcmpl-sep",
                "request": {"model": "tao", "messages": [{"role": "user", "content": prompt}]},
                "response": {"id": "chatcmpl-sep", "object": "chat.completion", "created": 0, "model": "v1",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": answer}}]},
                "model_version": "v1",
            }
        )  # fmt: skip
        log.flush()
    finally:
        log.close()
    [path] = served_files(tmp_path / "inbox")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4  # what a naive reader would see
    assert [row["id"] for row in rows_in(tmp_path / "inbox")] == ["chatcmpl-sep"]
    batch = load_prompts([path], DataSettings())
    assert batch.quarantine.empty and batch.prompts["prompt"].tolist() == [prompt]

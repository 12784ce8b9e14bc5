"""A local OpenAI-compatible judge endpoint for tests: POST /v1/chat/completions on an ephemeral port."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tao_pipeline.scoring.judge import LLMJudgeScorer


def chat_completion(content: str) -> str:
    return json.dumps(
        {
            "id": "cmpl-test",
            "object": "chat.completion",
            "model": "judge-test",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }
    )


class FakeJudgeServer:
    """Answers with ``reply(body, headers) -> (status, text)`` (or ``(status, text, seconds)`` to send the
    body one byte at a time, that many seconds apart); keeps every (body, headers) it received.
    GET /v1/models is answered by ``reply(None, headers)``."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple[dict, dict]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval makes shutdown() in teardown quick.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [headers.get("Authorization") for _, headers in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                # HTTP header names are case-insensitive (clients send "authorization" or "Authorization").
                headers = {name.title(): value for name, value in self.headers.items()}
                with server._lock:
                    server.requests.append((body, headers))
                answer = server.reply(body, headers) if self.path == "/v1/chat/completions" else (404, "not found")
                self._answer(answer)

            def do_GET(self):  # GET /v1/models: reply(None, headers)
                headers = {name.title(): value for name, value in self.headers.items()}
                self._answer(server.reply(None, headers) if self.path == "/v1/models" else (404, "not found"))

            def _answer(self, answer):
                status, text, trickle_s = (*answer, 0.0)[:3]  # a third item: seconds between the body's bytes
                data = text.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not trickle_s:
                        self.wfile.write(data)
                    for index in range(len(data)) if trickle_s else ():
                        self.wfile.write(data[index : index + 1])
                        self.wfile.flush()
                        time.sleep(trickle_s)
                except OSError:
                    pass  # the client gave up (the timeout tests)

            def log_message(self, *args):
                pass

        return Handler


def openai_judge(server: FakeJudgeServer, cache_dir: Path | None = None, **options) -> LLMJudgeScorer:
    """An LLM judge on the fake endpoint: no retries, a short timeout; ``options`` override the defaults."""
    defaults = {
        "backend": "openai",
        "base_url": server.base_url,
        "model": "judge-test",
        "timeout_s": 5.0,
        "max_retries": 0,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }
    return LLMJudgeScorer(**{**defaults, **options})

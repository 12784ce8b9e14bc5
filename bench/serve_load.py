"""`tao serve` under load: throughput and latency with 1, 8 and 32 concurrent clients, with and without a hostile one.

Well-behaved clients (the official ``openai`` client, one per simulated user, requests one after another) ask the
embedded model with mixed sampling settings (greedy; temperature 0.7, top-p 0.9; temperature 1.0; a seed), all
with ``--max-tokens`` tokens at most. At each concurrency level, side by side in this one run:

- ``batched``: the local engine as shipped (continuous batching, ``serve.max_batch_rows`` 16);
- ``one at a time``: the same server with ``serve.max_batch_rows=1`` (requests decoded one after another);
- ``batched + hostile``: the batched server while one hostile client, alongside, sends a 50 MB body, a lone
  surrogate in a prompt, a 4096-token request, and requests it hangs up on after 1 s (n=4 x 512 tokens).

Printed: requests, failures of well-behaved clients (the goal is 0), requests/s, completion tokens/s, p50/p95
latency of the well-behaved clients; what the hostile client got; and the two goals of issue 25: p95 with the
hostile client at most 2x p95 without it, and batched at least 2x one-at-a-time throughput at 32 clients.
``--compete N`` runs N CPU-bound processes during the whole benchmark (a busy machine).

    .venv/bin/python bench/serve_load.py [--clients 1 8 32] [--requests 64] [--max-tokens 64] [--compete 0]
                                         [--threads N] [--base-model-from ~/.tao]
    .venv/bin/python bench/serve_load.py --tiny     # the plumbing on a tiny random model, in a minute
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import openai
import pandas as pd
from common import bench_parser, fresh_home, show

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does, briefly.",
    "Give me three tips for better sleep.",
    "What is 17 * 23?",
    "Translate 'good morning' into Spanish and German.",
    "Name a famous painting and its painter.",
    "Summarise the water cycle in two sentences.",
]
SAMPLING = [
    {"temperature": 0.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.0},
    {"temperature": 0.8, "top_p": 0.95, "seed": 42},
]


@dataclass
class Level:
    """One measurement: latencies of the well-behaved clients, their tokens, failures, and the hostile outcomes."""

    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    hostile: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, mode: str, clients: int) -> dict:
        ordered = sorted(self.latencies)
        return {
            "mode": mode,
            "clients": clients,
            "requests": len(self.latencies) + len(self.failures),
            "innocent failures": len(self.failures),
            "requests/s": len(self.latencies) / self.seconds,
            "tokens/s": self.tokens / self.seconds,
            "p50 s": statistics.median(ordered) if ordered else float("nan"),
            "p95 s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan"),
        }


class Server:
    """`tao serve` as its own process on a free port, with the bench's settings plus ``overrides``."""

    def __init__(self, config: Path, overrides: list[str], logs: Path, name: str):
        self.port = _free_port()
        flags = [flag for item in overrides for flag in ("--set", item)]
        command = [sys.executable, "-m", "tao_pipeline.cli", "serve", "--config", str(config), "--port", str(self.port)]
        self.log = (logs / f"{name}.log").open("w")
        self.process = subprocess.Popen([*command, *flags], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"tao serve exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"tao serve was not ready within {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def well_behaved(url: str, clients: int, requests: int, max_tokens: int, level: Level) -> None:
    remaining = list(range(requests))

    async def user(number: int) -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)
        try:
            while remaining:
                i = remaining.pop()
                options = SAMPLING[(i + number) % len(SAMPLING)]
                messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                started = time.perf_counter()
                try:
                    answer = await client.chat.completions.create(
                        model="tao", messages=messages, max_tokens=max_tokens, **options
                    )
                except openai.OpenAIError as error:
                    level.failures.append(f"{type(error).__name__}: {str(error)[:120]}")
                    continue
                level.latencies.append(time.perf_counter() - started)
                level.tokens += answer.usage.completion_tokens
        finally:
            await client.close()

    await asyncio.gather(*(user(number) for number in range(clients)))


async def hostile(url: str, stop: asyncio.Event, long_tokens: int, level: Level) -> None:
    """One client that does what hurt the server before: a huge body, a lone surrogate, a very long answer, hang-ups."""

    def note(kind: str, outcome: str) -> None:
        level.hostile.setdefault(kind, []).append(outcome)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:

        async def post(kind: str, body: bytes | dict, timeout: float | None = None) -> None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                answer = await client.post(
                    url + "/chat/completions",
                    content=content,
                    headers={"content-type": "application/json"},
                    timeout=timeout or 600,
                )
                note(kind, str(answer.status_code))
            except httpx.TimeoutException:
                note(kind, "hung up")
            except httpx.HTTPError as error:
                note(kind, type(error).__name__)

        async def long_answers() -> None:
            dragon = [{"role": "user", "content": "Write a very long story about a dragon."}]
            story = {"model": "tao", "messages": dragon}
            try:
                while not stop.is_set():
                    await post(f"{long_tokens}-token request", {**story, "max_tokens": long_tokens})
            except asyncio.CancelledError:
                note(f"{long_tokens}-token request", "still decoding at the end")
                raise

        async def nuisance() -> None:
            huge = b'{"model": "tao", "messages": [{"role": "user", "content": "' + b"x" * (50 * 2**20) + b'"}]}'
            while not stop.is_set():
                await post("50 MB body", huge)
                await post("lone surrogate", b'{"model": "tao", "messages": [{"role": "user", "content": "a\\ud800"}]}')
                everything = [{"role": "user", "content": "Tell me everything."}]
                leaving = {"model": "tao", "messages": everything, "max_tokens": min(512, long_tokens), "n": 4}
                await post("hang up after 1 s (n=4 x 512)", leaving, timeout=1.0)
                await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(long_answers()), asyncio.create_task(nuisance())]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(url: str, clients: int, args, with_hostile: bool) -> Level:
    level, stop = Level(), asyncio.Event()
    enemy = asyncio.create_task(hostile(url, stop, args.long_tokens, level)) if with_hostile else None
    if enemy is not None:
        await asyncio.sleep(2)  # let it get going
    started = time.perf_counter()
    await well_behaved(url, clients, args.requests, args.max_tokens, level)
    level.seconds = time.perf_counter() - started
    if enemy is not None:
        stop.set()
        await enemy
    return level


def run(args) -> pd.DataFrame:
    home = fresh_home("serve-load", args.base_model_from)
    logs = Path(tempfile.mkdtemp(prefix="tao-bench-serve-logs-"))
    config = home / "tao.toml"
    model = ""
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.helpers import build_tiny_model

        model = f'base = "{build_tiny_model(home / "tiny-model")}"\ndtype = "float32"\n'
    config.write_text(f'home = "{home}"\n\n[model]\n{model}\n[serve]\nlog_roll_seconds = 5\n')
    threads = [f"serve.threads={args.threads}"] if args.threads else []
    threads += args.serve_set
    competitors = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.compete)
    ]  # a busy machine
    print(f"home {home}; server logs in {logs}; {args.compete} competing processes")
    rows, levels = [], {}
    try:
        for mode, overrides in (("batched", []), ("one at a time", ["serve.max_batch_rows=1"])):
            server = Server(config, [*threads, "serve.max_queued_rows=1024", *overrides], logs, mode.replace(" ", "-"))
            try:
                server.wait_ready()
                asyncio.run(measure(server.url, 1, argparse_copy(args, requests=2), False))  # warm-up
                for clients in args.clients:
                    for with_hostile in (False, True) if mode == "batched" else (False,):
                        name = mode + (" + hostile" if with_hostile else "")
                        level = asyncio.run(measure(server.url, clients, args, with_hostile))
                        levels[(name, clients)] = level
                        rows.append(level.row(name, clients))
                        print(rows[-1], flush=True)
                        if level.hostile:
                            print("   hostile:", {k: _counts(v) for k, v in level.hostile.items()}, flush=True)
            finally:
                server.stop()
    finally:
        for competitor in competitors:
            competitor.kill()
    table = pd.DataFrame(rows)
    show(f"tao serve under load ({args.requests} requests per row, max_tokens {args.max_tokens}, "
         f"{args.compete} competing processes, {os.cpu_count()} CPUs)", table)  # fmt: skip
    for clients in args.clients:
        clean, attacked = levels[("batched", clients)], levels[("batched + hostile", clients)]
        alone = levels[("one at a time", clients)]
        p95 = attacked.row("", clients)["p95 s"] / clean.row("", clients)["p95 s"]
        speed = clean.row("", clients)["tokens/s"] / alone.row("", clients)["tokens/s"]
        print(f"{clients} clients: p95 with the hostile client / without {p95:.2f}x (goal <= 2x); "
              f"batched / one at a time {speed:.2f}x tokens/s (goal >= 2x at 32); innocent failures "
              f"{len(clean.failures) + len(attacked.failures) + len(alone.failures)} (goal 0)")  # fmt: skip
        for failure in (clean.failures + attacked.failures + alone.failures)[:5]:
            print("   ", failure)
    return table


def argparse_copy(args, **changes):
    copy = type(args)(**vars(args))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


def _counts(outcomes: list[str]) -> dict[str, int]:
    return {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="well-behaved requests per row of the table")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=4096, help="max_tokens of the hostile long request")
    parser.add_argument("--compete", type=int, default=0, help="CPU-bound processes running alongside")
    parser.add_argument("--threads", type=int, default=None, help="serve.threads (default: the server's own)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: checks the plumbing only")
    parser.add_argument(
        "--serve-set", action="append", default=[], metavar="KEY=VALUE", help="a serve setting for both servers"
    )
    args = parser.parse_args()
    if args.tiny:
        args.long_tokens = min(args.long_tokens, 400)  # the tiny model's context is 512 tokens
    run(args)


if __name__ == "__main__":
    main()

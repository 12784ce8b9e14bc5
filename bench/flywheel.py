"""The live flywheel, measured under faults (`make bench-flywheel`).

On a fresh home, with nobody touching anything:

1. an upstream `tao serve` (the local engine: the model) and a front `tao serve --engine proxy`
   (what the app talks to; it logs every answer into the inbox) start, and so does the Dagster daemon;
2. a simulated app sends the demo's prompts over HTTP with the official openai client, 8 at a time;
3. the logs roll into the inbox, the ingestion sensor takes them, the round sensor opens a round at
   ``flywheel.min_new_prompts``, the daemon runs it, the gate promotes the challenger, and both
   servers swap to it;
4. the app sends the labeled prompts again and gets the new version's answers.

Faults injected meanwhile: the daemon is SIGKILLed in the middle of the round and restarted; a
read-write connection holds the lake's catalog locked while new logs arrive; the upstream is killed
for a while (the app's requests fail meanwhile) and restarted.

Printed: requests served and failed, p50/p95 latency, rows logged vs rows ingested, rounds completed,
minutes from the round's start to promotion and from promotion to the first answer by the new
version, and the labeled accuracy of answers served before vs after the swap. The invariants are
asserted: every logged row ingested exactly once, the round completed, the server switched.

`--tiny` runs the same with a tiny random model, short faults and a gate that lets its challenger
through (the mechanics, not the quality): that is the version CI runs (tests/test_flywheel_live.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import duckdb
import numpy as np
import openai
import pandas as pd
import requests
from scipy.stats import bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fresh_home  # noqa: E402
from tao_pipeline.cli.runner import prepare_dagster_home  # noqa: E402
from tao_pipeline.data.lake import connect_duckdb  # noqa: E402
from tao_pipeline.demo import DEMO_CONFIG  # noqa: E402
from tao_pipeline.evaluation.labels import load_labels  # noqa: E402
from tao_pipeline.scoring import PromptContext, build_scorer  # noqa: E402
from tao_pipeline.settings import SettingsSource  # noqa: E402

DEMO_DIR = Path(DEMO_CONFIG).parent
EMBEDDED_ROUND = [
    "flywheel.min_new_prompts=150",  # the app sends 200 prompts: one round, and too few left for a second
    "data.max_prompts=128",
    "generation.num_samples=6",
    "training.max_steps=30",
    "evaluation.test_time_k=0",
    "evaluation.pool_samples=2",
]


@dataclass
class Answer:
    prompt: dict
    phase: str
    sent_at: float  # wall clock (time.time())
    seconds: float
    model: str | None = None
    text: str | None = None
    error: str | None = None  # the server failed to answer
    refused: str | None = None  # the server refused the request as the API says (a prompt over the context)


@dataclass
class Bench:
    home: Path
    overrides: list[str]
    ports: dict[str, int]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    logs: Path = Path()

    @property
    def front(self) -> str:
        return f"http://127.0.0.1:{self.ports['front']}"

    def environment(self) -> dict[str, str]:
        source = SettingsSource(str(DEMO_CONFIG), tuple(self.overrides))
        return {**os.environ, **source.environment(), "DAGSTER_HOME": str(self.home / "dagster")}

    def start(self, name: str, command: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("a")
        self.processes[name] = subprocess.Popen(
            command, env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tao(self, *args: str) -> list[str]:
        """A `tao` command with the bench's settings (as flags; Dagster's processes read the environment)."""
        settings = ["--config", str(DEMO_CONFIG)] + [flag for item in self.overrides for flag in ("--set", item)]
        return [sys.executable, "-m", "tao_pipeline.cli", *args, *settings]

    def start_upstream(self) -> None:
        self.start(
            "upstream", self.tao("serve", "--port", str(self.ports["upstream"]), "--set", "serve.log_requests=false")
        )

    def start_daemon(self) -> None:
        daemon = str(Path(sys.executable).parent / "dagster-daemon")
        self.start("daemon", [daemon, "run", "-m", "tao_pipeline.definitions"])

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            process = self.processes.pop(name)
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise SystemExit(f"bench-flywheel: gave up waiting for {what} after {timeout_s:.0f}s")


def _health(bench: Bench, port_name: str = "front") -> dict:
    try:
        return requests.get(f"http://127.0.0.1:{bench.ports[port_name]}/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}


def _champion(bench: Bench) -> str | None:
    path = bench.home / "models" / "registry.duckdb"
    if not path.exists():
        return None
    try:
        with connect_duckdb(path, read_only=True, timeout_s=60) as con:  # waits out a writer's lock
            row = con.execute(
                "SELECT version_id, decided_at FROM promotions WHERE action = 'promote' "
                "ORDER BY decided_at DESC LIMIT 1"
            ).fetchone()
    except (duckdb.Error, TimeoutError):
        return None
    return row


def _serves_champion(bench: Bench) -> str | None:
    champion, serving = _champion(bench), _health(bench).get("model_version")
    return serving if champion and serving == champion[0] else None


def _round_runs(bench: Bench) -> pd.DataFrame:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(bench.home / "dagster")) as instance:
        records = instance.get_run_records(dg.RunsFilter(job_name="tao_round"))
        return pd.DataFrame(
            [
                {
                    "run_id": r.dagster_run.run_id,
                    "partition": r.dagster_run.tags.get("dagster/partition"),
                    "status": r.dagster_run.status.value,
                    "created": r.create_timestamp.timestamp(),
                    # a retry inherits its parent's tags: only the run that failed was orphaned
                    "orphaned": "tao/orphaned" in r.dagster_run.tags and r.dagster_run.status.value == "FAILURE",
                    "resumed": r.dagster_run.parent_run_id is not None,  # a retry by Dagster's run retries
                    "ended": r.end_time,
                }
                for r in records
            ],
            columns=["run_id", "partition", "status", "created", "ended", "orphaned", "resumed"],
        )


async def _send(bench: Bench, prompts: list[dict], phase: str, concurrency: int, max_tokens: int) -> None:
    client = openai.AsyncOpenAI(base_url=bench.front + "/v1", api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: dict) -> None:
        async with gate:
            started, sent_at = time.perf_counter(), time.time()
            answer = Answer(prompt, phase, sent_at, 0.0)
            try:
                completion = await client.chat.completions.create(
                    model="tao",
                    messages=[{"role": "user", "content": prompt["prompt"]}],
                    max_tokens=max_tokens,
                    temperature=0,
                    metadata={"task": prompt["task"]},
                )
                answer.model, answer.text = completion.model, completion.choices[0].message.content
            except openai.OpenAIError as error:
                if isinstance(error, openai.BadRequestError) and "maximum context length" in str(error):
                    answer.refused = "longer than the model's context"  # the API's 400, not a failure
                else:
                    answer.error = f"{type(error).__name__}: {str(error)[:120]}"
            answer.seconds = time.perf_counter() - started
            bench.answers.append(answer)

    await asyncio.gather(*(one(prompt) for prompt in prompts))
    await client.close()


def send(bench: Bench, prompts: list[dict], phase: str, args) -> None:
    asyncio.run(_send(bench, prompts, phase, args.concurrency, args.max_tokens))


def demo_prompts() -> list[dict]:
    """The demo logs' distinct prompts (its deliberately broken lines are left out: this app sends good ones)."""
    rows = []
    for line in (DEMO_DIR / "usage_logs.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    seen, prompts = set(), []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                prompts.append({"prompt": row["prompt"], "task": row.get("task") or "general"})
    return prompts


def run(args) -> dict:
    home = fresh_home("flywheel", args.base_model_from)
    bench = Bench(home, [f"home='{home}'", *args.overrides], {"front": _free_port(), "upstream": _free_port()})
    bench.logs = Path(tempfile.mkdtemp(prefix="tao-bench-flywheel-logs-"))
    from tao_pipeline.settings import load_settings

    settings = load_settings(DEMO_CONFIG, bench.overrides)
    prepare_dagster_home(settings)
    prompts = demo_prompts()[: args.prompts]
    print(f"home {home}; process logs in {bench.logs}; {len(prompts)} prompts")
    try:
        bench.start_upstream()
        bench.start(
            "front",
            bench.tao("serve", "--port", str(bench.ports["front"]), "--engine", "proxy",
                 "--upstream", f"http://127.0.0.1:{bench.ports['upstream']}/v1"),
        )  # fmt: skip
        bench.start_daemon()
        _wait("the servers", lambda: _health(bench).get("status") == "ok", 600)
        base = _health(bench)["model_version"]
        print(f"serving {base}; the app sends {len(prompts)} prompts, {args.concurrency} at a time")

        bench.events["traffic"] = time.time()
        send(bench, prompts, "before", args)
        bench.events["sent"] = time.time()

        # The round opens by itself at the threshold; kill the daemon in the middle of it.
        _wait("the round sensor to open a round", lambda: len(_round_runs(bench)) > 0, args.round_wait_s, 2)
        runs = _round_runs(bench)
        print(
            f"round opened: {runs['partition'].iloc[0]} ({time.time() - bench.events['sent']:.0f}s after the traffic)"
        )
        _wait("the round's run to start", lambda: (_round_runs(bench)["status"] == "STARTED").any(), 600, 0.5)
        time.sleep(args.kill_after_s)
        bench.kill("daemon")  # its whole process group: the code server and the round's run worker too
        print("daemon SIGKILLed (with its process group) in the middle of the round; restarting it in 5 s")
        time.sleep(5)
        bench.start_daemon()

        # New traffic while the catalog is locked by someone's read-write shell.
        late = demo_prompts()[args.prompts : args.prompts + args.late_prompts]
        with duckdb.connect(str(home / "lake" / "catalog.duckdb")):
            print(f"catalog locked read-write for {args.lock_s}s while {len(late)} more prompts arrive")
            send(bench, late, "during-lock", args)
            time.sleep(args.lock_s)

        # The upstream dies for a while; the app's requests fail meanwhile.
        bench.kill("upstream")
        bench.events["outage_start"] = time.time()
        print(f"upstream killed for {args.outage_s}s")
        outage_end = time.monotonic() + args.outage_s
        while time.monotonic() < outage_end:
            send(bench, prompts[:4], "outage", args)
            time.sleep(2)
        bench.start_upstream()
        bench.events["outage_end"] = time.time()
        _wait("the upstream", lambda: _health(bench, "upstream").get("status") == "ok", 600)

        # Promotion, then the swap, with nobody touching anything.
        _wait("a promotion", lambda: (row := _champion(bench)) and row[0] != base, args.round_wait_s, 5)
        print(f"promoted {_champion(bench)[0]}")
        version = _wait("the front server to serve the champion", lambda: _serves_champion(bench), 600, 0.5)
        bench.events["promoted"] = _champion(bench)[1].replace(tzinfo=UTC).timestamp()
        send(bench, prompts, "after", args)
        served = sum(answer.error is None and answer.refused is None for answer in bench.answers)

        def all_in() -> bool:
            logged, ingested, quarantined, _ = _rows(bench)
            return logged == served and logged == ingested + quarantined

        _wait("every answer to be logged and ingested", all_in, args.ingest_wait_s, 3)
        return report(bench, settings, base, version)
    finally:
        bench.stop_all()


def _rows(bench: Bench) -> tuple[int, int, int, int]:
    """Rows the server logged; of them, rows ingested and rows quarantined (with the reason, e.g. the
    demo's over-long prompt); distinct ids among the ingested ones."""
    inbox = bench.home / "inbox"
    logged = sum(
        len(path.read_text().splitlines())
        for folder in (inbox, inbox / "processed")
        if folder.is_dir()
        for path in folder.glob("serve-*.jsonl")
    )
    try:
        with connect_duckdb(bench.home / "lake" / "catalog.duckdb", read_only=True, timeout_s=60) as con:
            ingested, distinct = con.execute(
                "SELECT count(*), count(DISTINCT external_id) FROM usage_logs "
                "WHERE external_id LIKE 'chatcmpl-%' OR external_id LIKE 'cmpl-%'"
            ).fetchone()
            [quarantined] = con.execute(
                "SELECT count(*) FROM quarantined_rows WHERE source_file LIKE '%/serve-%'"
            ).fetchone()
    except (duckdb.Error, TimeoutError):  # no catalog yet, or locked by a writer too long
        return logged, -1, -1, -1
    return logged, ingested, quarantined, distinct


def report(bench: Bench, settings, base: str, version: str) -> dict:
    answers = pd.DataFrame([a.__dict__ for a in bench.answers])
    ok = answers[answers["error"].isna() & answers["refused"].isna()]
    logged, ingested, quarantined, distinct = _rows(bench)
    runs = _round_runs(bench)
    completed = runs[runs["status"] == "SUCCESS"]
    first_new = ok[ok["model"] == version]["sent_at"].min()
    served = ok.assign(prompt_text=ok["prompt"].map(lambda p: p["prompt"]), task=ok["prompt"].map(lambda p: p["task"]))
    before = served[(served["phase"] == "before") & (served["model"] == base)]
    after = served[(served["phase"] == "after") & (served["model"] == version)]
    paired = served_accuracy(before, after, settings)
    with connect_duckdb(bench.home / "lake" / "catalog.duckdb", read_only=True, timeout_s=60) as con:
        heldout = set(con.execute("SELECT prompt FROM raw_prompts WHERE split = 'heldout'").df()["prompt"])
    unseen = served_accuracy(before[before["prompt_text"].isin(heldout)], after[after["prompt_text"].isin(heldout)],
                             settings)  # fmt: skip
    outage = answers[answers["phase"] == "outage"]
    figures = {
        "requests sent": len(answers),
        "requests served": len(ok),
        "requests failed": int(answers["error"].notna().sum()),
        "requests refused as longer than the model's context (400)": int(answers["refused"].notna().sum()),
        "failed outside the upstream outage": int(
            answers[answers["error"].notna() & (answers["phase"] != "outage")].shape[0]
        ),
        "failed during the upstream outage": f"{int(outage['error'].notna().sum())} of {len(outage)}",
        "latency p50 (s)": round(float(ok["seconds"].quantile(0.5)), 2),
        "latency p95 (s)": round(float(ok["seconds"].quantile(0.95)), 2),
        "rows logged by the server": logged,
        "rows ingested": ingested,
        "rows quarantined (with a reason)": quarantined,
        "distinct ids ingested": distinct,
        "rounds completed": len(completed),
        "round runs that lost their process / resumes": f"{int(runs['orphaned'].sum())} / {int(runs['resumed'].sum())}",
        "minutes from the round's start to promotion": round(
            (bench.events["promoted"] - runs["created"].min()) / 60, 1
        ),
        "minutes from promotion to the first answer by it": round((first_new - bench.events["promoted"]) / 60, 2),
        f"labeled accuracy served before the swap ({base})": paired["before"],
        f"labeled accuracy served after the swap ({version})": paired["after"],
        "after - before, same prompts (95% paired bootstrap CI)": paired["difference"],
        "after - before, the round's held-out prompts only": f"{unseen['difference']} ({unseen['after']})",
    }
    print("\nthe live flywheel\n")
    print(pd.DataFrame({"figure": list(figures), "value": [str(v) for v in figures.values()]}).to_markdown(index=False))
    assert logged == len(ok), (logged, len(ok))  # every answer served was logged
    assert logged == ingested + quarantined and ingested == distinct > 0, (logged, ingested, quarantined, distinct)
    assert len(completed) >= 1, runs
    failed = answers[answers["error"].notna() & (answers["phase"] != "outage")]
    assert figures["failed outside the upstream outage"] == 0, "\n".join(
        f"{row.phase}: {row.error}" for row in failed.head(8).itertuples()
    )
    assert (ok[ok["phase"] == "after"]["model"] == version).all(), ok[ok["phase"] == "after"]["model"].value_counts()
    print("\ninvariants hold: every logged row ingested exactly once, the round completed, the server switched")
    return figures


def served_accuracy(before: pd.DataFrame, after: pd.DataFrame, settings) -> dict[str, str]:
    """Labeled accuracy of the answers served before and after the swap, on the labeled prompts both
    answered (columns prompt_text, task, text), with 95% bootstrap intervals; the difference is paired."""
    labels = load_labels(settings.data.labels)
    scorer = build_scorer(settings.scoring)

    def marks(frame: pd.DataFrame) -> pd.Series:
        frame = frame.drop_duplicates("prompt_text").set_index("prompt_text")
        correct = {}
        for prompt, row in frame.iterrows():
            accepted = labels.get(prompt.strip())
            if accepted:
                context = PromptContext(prompt, row["task"])
                correct[prompt] = scorer.matches_label(context, scorer.answers(context, [row["text"]])[0], accepted)
        return pd.Series(correct, dtype=float)

    first, second = marks(before), marks(after)
    shared = first.index.intersection(second.index)
    first, second = first[shared].to_numpy(), second[shared].to_numpy()
    if len(shared) < 2:
        return {"before": "-", "after": "-", "difference": "-"}

    def interval(*samples, statistic) -> str:
        result = bootstrap(samples, statistic, paired=True, confidence_level=0.95, n_resamples=5000,
                           random_state=0, method="percentile")  # fmt: skip
        low, high = result.confidence_interval
        return (
            f"{statistic(*samples):+.3f} [{low:+.3f}, {high:+.3f}]"
            if len(samples) == 2
            else (f"{statistic(*samples):.3f} [{low:.3f}, {high:.3f}] (n={len(shared)})")
        )

    return {
        "before": interval(first, statistic=np.mean),
        "after": interval(second, statistic=np.mean),
        "difference": interval(second, first, statistic=lambda a, b: np.mean(a) - np.mean(b)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", metavar="MODEL_DIR", help="a tiny model folder: CI's short version")
    parser.add_argument("--base-model-from", help="a home (or folder) with the converted embedded model")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--late-prompts", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--kill-after-s", type=float, default=60, help="SIGKILL the daemon this long after the round's run started"
    )
    parser.add_argument("--lock-s", type=float, default=30)
    parser.add_argument("--outage-s", type=float, default=60)
    parser.add_argument("--round-wait-s", type=float, default=3600)
    parser.add_argument("--ingest-wait-s", type=float, default=300)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    common = ["data.logs=[]", "flywheel.sensor_interval_s=5", "flywheel.settle_seconds=2", "serve.log_roll_seconds=5",
              "serve.swap_poll_seconds=1", "flywheel.schedule_cron='0 0 1 1 *'"]  # fmt: skip
    if args.tiny:
        common += [f"model.base='{args.tiny}'", "model.dtype='float32'", "flywheel.min_new_prompts=20",
                   "data.max_prompts=100", "generation.num_samples=2", "generation.max_new_tokens=8",
                   "training.max_steps=2", "evaluation.test_time_k=0", "evaluation.pool_samples=2",
                   "evaluation.max_new_tokens=8", "evaluation.min_win_rate=0.0", "evaluation.max_accuracy_drop=1.0",
                   "evaluation.max_length_ratio=100.0", "pairs.min_margin=0.0",
                   "scoring.min_agreement=0.0", "flywheel.run_start_timeout_s=60"]  # fmt: skip
    else:
        common += EMBEDDED_ROUND
    args.overrides = [*common, *args.extra]
    run(args)


if __name__ == "__main__":
    main()

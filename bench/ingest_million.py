"""Ingestion at scale: a million-row JSONL usage log streamed into the lake in bounded memory.

Generates JSONL usage logs (1,000,000 rows and a 250,000-row control, about 1% malformed lines
of several kinds), then ingests each in a fresh Python process with the pipeline's own code
path (``ingest_to_lake``, what the usage_logs asset calls; ``--dagster`` materializes the asset
itself) and prints rows/s, wall time and peak RSS. Peak RSS is the process's high-water mark
(``ru_maxrss``), cross-checked by a thread sampling RSS every 5 ms; "growth" is the peak minus
the RSS just before ingestion started (interpreter and libraries loaded). Memory is bounded
when the growth barely changes between 250k and 1M rows and stays far below the file size.
``--whole`` also measures ``ingest_file`` plus ``Lake.write`` (the whole file in memory, roughly
what ingestion did before it streamed), for reference. Prints the figures; asserts only that no
row was lost.

    .venv/bin/python bench/ingest_million.py [--rows 1000000] [--control-rows 250000] [--whole] [--dagster]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

MIB = 2**20
TASKS = ["arithmetic", "short_answer", "general", "sql", "summarize"]
WORDS = ["alpha", "beta", "gamma", "delta", "lake", "river", "model"]
MALFORMED = [
    b'{"prompt": "What is 2 + ',  # truncated JSON
    b"upstream error: connection reset by peer",  # not JSON
    b'{"task": "arithmetic", "id": "no-prompt"}',  # missing prompt
    b'{"prompt": "   "}',  # empty prompt
    b'{"prompt": "caf\xe9 au lait"}',  # invalid UTF-8
    b'["a", "list"]',  # not an object
]


def log_line(rng: random.Random, number: int) -> bytes:
    a, b = rng.randrange(1000), rng.randrange(1000)
    task = rng.choice(TASKS)
    record: dict = {"id": f"req-{number}", "task": task}
    if task == "arithmetic":
        record["prompt"] = f"What is {a} + {b}? Reply with just the number."
    else:
        words = " ".join(rng.choice(WORDS) for _ in range(a % 30))
        record["prompt"] = f"Question {a}-{b} about {task}: {words}".strip()
    if number % 4 == 0:
        record["system"] = "You are a concise assistant."
    if number % 9 == 0:
        record["constraints"] = {"max_words": 10 + a % 40}
    return json.dumps(record).encode()


def write_usage_log(path: Path, rows: int, bad_share: float, seed: int = 7) -> int:
    """A JSONL file of ``rows`` lines, ``bad_share`` of them malformed; returns the number of malformed lines."""
    rng, bad, lines = random.Random(seed), 0, []
    with path.open("wb") as handle:
        for number in range(1, rows + 1):
            if rng.random() < bad_share:
                lines.append(MALFORMED[bad % len(MALFORMED)])
                bad += 1
            else:
                lines.append(log_line(rng, number))
            if len(lines) == 10_000:
                handle.write(b"\n".join(lines) + b"\n")
                lines = []
        if lines:
            handle.write(b"\n".join(lines) + b"\n")
    return bad


# -- the measured child process -----------------------------------------------------------------


class PeakSampler(threading.Thread):
    """Samples this process's RSS every few milliseconds; ``peak`` is the largest seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self._process, self._interval_s, self._done = psutil.Process(), interval_s, threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval_s)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def ingest_with_domain_code(path: Path, home: Path, mode: str) -> dict:
    from tao_pipeline.data.ingest import batch_key, ingest_file, ingest_to_lake
    from tao_pipeline.data.lake import Lake
    from tao_pipeline.settings import DataSettings

    limits, lake, key = DataSettings(), Lake(home / "lake"), batch_key(path)
    if mode == "whole":
        batch = ingest_file(path, limits)
        lake.write("usage_logs", key, batch.rows.assign(batch=key))
        lake.write("quarantined_rows", key, batch.quarantine.assign(batch=key))
        return {
            "rows": len(batch.rows),
            "quarantined": len(batch.quarantine),
            "distinct_prompts": int(batch.rows["prompt_id"].nunique()),
        }
    summary = ingest_to_lake(path, limits, lake, key)
    return {"rows": summary.rows, "quarantined": summary.quarantined, "distinct_prompts": summary.distinct_prompts}


def ingest_with_dagster(path: Path, home: Path) -> dict:
    import dagster as dg

    from tao_pipeline.data.ingest import batch_key
    from tao_pipeline.defs.assets.ingest import usage_logs
    from tao_pipeline.defs.resources import build_resources

    config = home / "tao.toml"
    config.write_text(f'home = "{home}"\n[data]\nlogs = []\n')
    key = batch_key(path)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("log_batches", [key])
        result = dg.materialize(
            [usage_logs],
            partition_key=key,
            instance=instance,
            resources=build_resources(str(config)),
            run_config={"ops": {"usage_logs": {"config": {"path": str(path)}}}},
        )
    metadata = result.asset_materializations_for_node("usage_logs")[0].metadata
    return {name: metadata[name].value for name in ("rows", "quarantined", "distinct_prompts")}


def child(path: Path, home: Path, mode: str) -> None:
    """Run one ingestion in this (fresh) process and print its figures as one JSON line."""
    if mode == "dagster":
        import dagster  # noqa: F401  (loaded before the baseline, like the libraries below)
    import duckdb  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import tao_pipeline.data.ingest  # noqa: F401

    baseline = psutil.Process().memory_info().rss
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    counts = ingest_with_dagster(path, home) if mode == "dagster" else ingest_with_domain_code(path, home, mode)
    wall = time.perf_counter() - started
    sampled = sampler.stop()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {**counts, "wall_s": wall, "baseline": baseline, "peak": max(max_rss, sampled), "sampled_peak": sampled}
        )
    )


# -- the driver ---------------------------------------------------------------------------------


def measure(path: Path, mode: str, workdir: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"home-{mode}-", dir=workdir))
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), str(home), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "TAO_HOME": str(home)},
    )
    if out.returncode != 0:
        raise SystemExit(f"the {mode} ingestion of {path.name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: list[dict]) -> None:
    header = (
        f"{'run':<30} {'lines':>9} {'file MiB':>8} {'kept':>9} {'quarant.':>8} {'distinct':>9} "
        f"{'wall s':>7} {'rows/s':>9} {'base MiB':>8} {'peak MiB':>8} {'growth':>7} {'growth/file':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        growth = (r["peak"] - r["baseline"]) / MIB
        print(
            f"{r['label']:<30} {r['lines']:>9,} {r['file_mib']:>8.1f} {r['rows']:>9,} {r['quarantined']:>8,} "
            f"{r['distinct_prompts']:>9,} {r['wall_s']:>7.1f} {r['lines'] / r['wall_s']:>9,.0f} "
            f"{r['baseline'] / MIB:>8.0f} {r['peak'] / MIB:>8.0f} {growth:>7.0f} {growth / r['file_mib']:>10.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--control-rows", type=int, default=250_000, help="A smaller file: peak should barely differ.")
    parser.add_argument("--bad-share", type=float, default=0.01, help="Share of malformed lines.")
    parser.add_argument("--whole", action="store_true", help="Also measure ingest_file (whole file in memory).")
    parser.add_argument("--dagster", action="store_true", help="Also materialize the usage_logs asset itself.")
    parser.add_argument("--child", nargs=3, metavar=("FILE", "HOME", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return

    from tao_pipeline.data.ingest import CHUNK_ROWS

    results = []
    with tempfile.TemporaryDirectory(prefix="tao-ingest-bench-") as tmp:
        workdir = Path(tmp)
        for rows in (args.control_rows, args.rows):
            path = workdir / f"usage-{rows}.jsonl"
            started = time.perf_counter()
            bad = write_usage_log(path, rows, args.bad_share)
            size = path.stat().st_size / MIB
            print(
                f"generated {path.name}: {rows:,} lines, {bad:,} malformed, {size:.1f} MiB "
                f"in {time.perf_counter() - started:.1f}s"
            )
            modes = ["stream"] + (["dagster"] if args.dagster else []) + (["whole"] if args.whole else [])
            for mode in modes:
                result = measure(path, mode, workdir)
                assert (result["rows"], result["quarantined"]) == (rows - bad, bad), result  # no row lost
                label = {
                    "stream": "ingest_to_lake (streaming)",
                    "dagster": "usage_logs asset (Dagster)",
                    "whole": "ingest_file (whole file)",
                }[mode]
                results.append({**result, "label": label, "lines": rows, "file_mib": size})
                print(f"  {label}: {result['wall_s']:.1f}s")
    print(
        f"\nchunk size: {CHUNK_ROWS:,} rows; peak = max(ru_maxrss, RSS sampled every 5 ms); "
        "growth = peak - RSS before ingesting; growth/file = growth / file size\n"
    )
    report(results)
    print()
    for label in dict.fromkeys(r["label"] for r in results):
        small, large = [r for r in results if r["label"] == label]
        print(
            f"{label}: {large['lines'] / small['lines']:.0f}x the rows, peak RSS {large['peak'] / MIB:.0f} MiB vs "
            f"{small['peak'] / MIB:.0f} MiB ({(large['peak'] - small['peak']) / MIB:+.0f} MiB); "
            f"{(large['peak'] - large['baseline']) / MIB:.0f} MiB over baseline for a {large['file_mib']:.0f} MiB file"
        )


if __name__ == "__main__":
    main()

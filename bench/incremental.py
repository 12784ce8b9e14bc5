"""Incremental cost: rerun a round after 10% new prompts arrive; unchanged work must not be redone.

A fresh home ingests 90% of the demo log lines and runs a default round; then the other 10%
arrive in the inbox and the same round is re-materialized (`tao round --rerun round-0001`).
Responses are cached by (prompt, model version, sampling parameters) and scores by (prompt,
exact candidate group, scoring settings), so the rerun generates and scores only the new
prompts. Training runs again (its pairs changed) and evaluation regenerates only for the new
checkpoint. Prints both runs' per-stage wall time side by side and the cache counts.

    .venv/bin/python bench/incremental.py [--new-fraction 0.1] [--base-model-from ~/.tao]
"""

from __future__ import annotations

import pandas as pd
from common import DEMO, bench_parser, fresh_home, run_metadata, show

from tao_pipeline.cli.runner import run_round
from tao_pipeline.common.hashing import content_hash
from tao_pipeline.demo import DEMO_LOGS
from tao_pipeline.settings import load_settings


def split_logs(home, new_fraction: float):
    """Deterministically put ~new_fraction of the demo log lines aside as the late arrivals."""
    lines = DEMO_LOGS.read_text(encoding="utf-8").splitlines(keepends=True)
    late = [int(content_hash("late", line), 16) % 1000 < new_fraction * 1000 for line in lines]
    first, second = home / "first.jsonl", home / "late.jsonl"
    first.write_text("".join(line for line, is_late in zip(lines, late) if not is_late), encoding="utf-8")
    second.write_text("".join(line for line, is_late in zip(lines, late) if is_late), encoding="utf-8")
    return first, second, sum(late), len(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--new-fraction", type=float, default=0.1)
    args = parser.parse_args()
    home = fresh_home("incremental", args.base_model_from)
    first_logs, late_logs, late_count, total = split_logs(home, args.new_fraction)
    overrides = [f'data.logs=["{first_logs}"]']
    settings = load_settings(DEMO, overrides)
    print(f"home {home}: {total - late_count} log lines now, {late_count} later ({late_count / total:.1%})")

    first = run_round(DEMO, overrides, echo=print)
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    late_logs.rename(settings.inbox_dir / late_logs.name)
    rerun = run_round(DEMO, overrides, echo=print, rerun=first.round_id)
    if not (first.completed and rerun.completed):
        raise SystemExit("a run failed; see `tao ui`")

    stages = first.stages[["stage", "seconds"]].merge(
        rerun.stages[["stage", "seconds"]], on="stage", suffixes=("_first", "_rerun")
    )
    stages["rerun / first"] = (stages["seconds_rerun"] / stages["seconds_first"]).round(2)
    show("per stage (seconds)", stages)
    counts = []
    for name, report in [("first run", first), ("rerun", rerun)]:
        generated = run_metadata(settings.dagster_home, report.run_id, "candidate_responses")
        scored = run_metadata(settings.dagster_home, report.run_id, "response_scores")
        counts.append(
            {
                "run": name,
                "train prompts": generated["prompts"],
                "prompts generated": generated["prompts_generated"],
                "prompts from response cache": generated["prompts_from_cache"],
                "prompts scored": scored["prompts_scored"],
                "prompts from score cache": scored["prompts_from_cache"],
                "minutes": round(report.seconds / 60, 2),
            }
        )
    show("what each run did", pd.DataFrame(counts))
    print(
        f"\nrerun / first run wall time: {rerun.seconds / first.seconds:.2f} "
        f"({rerun.seconds / 60:.1f} min vs {first.seconds / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()

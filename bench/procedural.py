"""A task family the demo does not contain, generated from a seed, its labels kept apart from the pipeline.

Two tasks a small instruction model gets right part of the time, so there is room to gain and to lose:

- ``compare``: "Which number is larger, 417 or 392? Reply with just the number."
- ``difference``: "What is 17 minus 9? Reply with just the number." (two numbers up to 30, never negative)

A first version had ``sequence`` ("What number comes next: 3, 7, 11, 15?") instead of ``difference``: the
embedded 135M model answered 0 of 44 held-out ones before and after a round (README, "Training recipe"), a task
with no room to gain, so it was replaced.

``write_family`` writes usage logs in the inbox format (what an app would log: no answers) and, in a separate
file, the gold answers, which only the evaluation reads (``data.labels``). ``family_overrides`` are the settings
a round on them needs: the files, and a scoring recipe per task (the vote on the extracted number, as for the
demo's arithmetic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("compare", "difference")


def compare(rng: random.Random) -> tuple[str, str]:
    digits = rng.choice((2, 3, 3, 4))
    low, high = 10 ** (digits - 1), 10**digits - 1
    first, second = rng.sample(range(low, high + 1), 2)
    return f"Which number is larger, {first} or {second}? Reply with just the number.", str(max(first, second))


def difference(rng: random.Random) -> tuple[str, str]:
    first, second = sorted(rng.sample(range(2, 31), 2), reverse=True)
    return f"What is {first} minus {second}? Reply with just the number.", str(first - second)


def write_family(folder: Path, count: int = 400, seed: int = 7) -> tuple[Path, Path]:
    """``count`` distinct prompts (half per task) as usage logs, and their gold answers in another file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    logs, labels, seen = [], [], set()
    for _ in range(100 * count):  # bounded: a task has finitely many distinct prompts
        if len(logs) == count:
            break
        task = TASKS[len(logs) % len(TASKS)]
        prompt, answer = (compare if task == "compare" else difference)(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        logs.append({"id": f"proc-{len(logs):05d}", "prompt": prompt, "task": task})
        labels.append({"prompt": prompt, "answer": answer, "aliases": [], "task": task})
    if len(logs) < count:
        raise ValueError(f"only {len(logs)} distinct prompts found for count={count}: the tasks have too few")
    logs_path, labels_path = folder / "usage_logs.jsonl", folder / "labels.jsonl"
    logs_path.write_text("".join(json.dumps(row) + "\n" for row in logs), encoding="utf-8")
    labels_path.write_text("".join(json.dumps(row) + "\n" for row in labels), encoding="utf-8")
    return logs_path, labels_path


def family_overrides(logs: Path, labels: Path) -> list[str]:
    """Settings overrides (over the demo's) for a round on the generated family."""
    return [
        f"data.logs=['{logs}']",
        f"data.labels='{labels}'",
        *[f"scoring.scorers.{task}={{self_consistency=1.0, number_format=0.25}}" for task in TASKS],
        *[f"scoring.extractors.{task}='last_number'" for task in TASKS],
    ]

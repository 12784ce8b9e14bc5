"""The optional labels file: read by evaluation only, never by scoring, pairing or training."""

from __future__ import annotations

import json
from pathlib import Path


def load_labels(path: Path | None) -> dict[str, list[str]]:
    """Labels file (JSONL: prompt, answer, aliases) -> prompt text -> accepted answers. Evaluation only."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} (setting data.labels) does not exist")
    labels: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answers = [str(record["answer"]), *map(str, record.get("aliases") or [])]
                labels[str(record["prompt"]).strip()] = answers
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"labels file {path}:{line_number} is malformed: {error}") from error
    return labels

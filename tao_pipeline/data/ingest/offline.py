"""Usage-log files straight into prompts, without a lake: for a notebook or a benchmark."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tao_pipeline.data.ingest.readers import read_jsonl
from tao_pipeline.data.ingest.validation import QUARANTINE_COLUMNS, LogEvent, LogRow
from tao_pipeline.data.prompts import prompt_id_for, prompts_from_rows
from tao_pipeline.settings import DataSettings


@dataclass
class PromptBatch:
    prompts: pd.DataFrame
    quarantine: pd.DataFrame
    log_rows: int
    duplicates: int


def load_prompts(paths: Iterable[Path], limits: DataSettings) -> PromptBatch:
    """Read JSONL usage-log files straight into split prompts plus quarantined rows (no lake needed).

    The pipeline itself streams files into the lake (``ingest_to_lake``); this is the same
    validation and grouping for a notebook or a benchmark. Here ``log_ids`` are the rows' own ids.
    """
    good: list[LogRow] = []
    bad: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"usage-log file {str(path)!r} (setting data.logs) does not exist")
        for item in read_jsonl(path, limits):
            if isinstance(item, LogRow):
                good.append(item)
            elif not isinstance(item, LogEvent):  # feedback and batch outputs need the lake's joins
                bad.append(item)
    rows = pd.DataFrame(
        [
            {
                "prompt_id": prompt_id_for(row.prompt, row.system, row.constraints, row.history),
                "prompt": row.prompt.strip(),
                "system": row.system,
                "history": row.history,
                "task": row.task,
                "constraints": row.constraints,
                "log_id": row.log_id,
                "source_file": row.source_file,
            }
            for row in good
        ]
    )
    prompts = prompts_from_rows(rows, limits)
    duplicates = len(good) - (rows["prompt_id"].nunique() if len(rows) else 0)
    quarantine = pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)
    return PromptBatch(prompts, quarantine, len(good) + len(bad), duplicates)

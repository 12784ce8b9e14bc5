"""Small helpers that turn tables and series into Dagster metadata a person wants to read."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import dagster as dg
import pandas as pd

PREVIEW_ROWS = 10
HISTOGRAM_BINS = 10
_BLOCKS = " ▁▂▃▄▅▆▇█"


def md_table(frame: pd.DataFrame, rows: int = PREVIEW_ROWS) -> dg.MetadataValue:
    preview = frame.head(rows).copy()
    for column in preview.columns:
        if preview[column].dtype == object:
            preview[column] = preview[column].map(lambda v: (str(v)[:80] + "…") if len(str(v)) > 80 else v)
    return dg.MetadataValue.md(preview.to_markdown(index=False))


def histogram(
    values: Sequence[float], bins: int = HISTOGRAM_BINS, low: float = 0.0, high: float = 1.0
) -> dg.MetadataValue:
    """A text histogram: bin | count | bar, readable in the asset's metadata panel."""
    series = pd.Series(list(values), dtype=float).clip(low, high)
    counts = pd.cut(series, bins=[low + (high - low) * i / bins for i in range(bins + 1)], include_lowest=True)
    table = counts.value_counts(sort=False)
    peak = max(table.max(), 1)
    lines = ["| bin | count | |", "|---|---:|---|"]
    lines += [f"| {interval} | {count} | {'█' * round(20 * count / peak)} |" for interval, count in table.items()]
    return dg.MetadataValue.md("\n".join(lines))


def sparkline(values: Sequence[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BLOCKS[round((v - low) / span * (len(_BLOCKS) - 1))] for v in values)


def plot(png: bytes) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata panel (markdown with a data URI)."""
    encoded = base64.b64encode(png).decode("ascii")
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{encoded})")

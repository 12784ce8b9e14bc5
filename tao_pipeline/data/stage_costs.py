"""What each stage of a round cost: one ``stage_costs`` partition per (round, stage), so stages never race.

A partition is named ``<round>.<stage>`` and holds one row: tokens generated, LLM-judge calls and
their tokens, CPU, GPU and wall seconds of the stage's latest materialization (work served from a
cache costs nothing, so a re-materialization records only what it did again). Money is not stored:
it is the figures times the prices configured when it is read (``costs.*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from tao_pipeline.common.profiling import StageMeter
from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import CostSettings

STAGE_COSTS_TABLE = "stage_costs"


@dataclass(frozen=True)
class StageCost:
    stage: str
    generated_tokens: int = 0
    judge_calls: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    @classmethod
    def measured(cls, stage: str, meter: StageMeter) -> StageCost:
        return cls(
            stage,
            **meter.usage.as_dict(),
            cpu_seconds=meter.cpu_seconds,
            gpu_seconds=meter.gpu_seconds,
            wall_seconds=meter.seconds,
        )

    def figures(self) -> dict[str, float]:
        """Every measured figure, by name (the stage left out)."""
        return {name: value for name, value in asdict(self).items() if name != "stage"}

    def money(self, prices: CostSettings) -> float | None:
        """The priced figures times their prices, summed; None when no price is set."""
        parts = [
            (prices.per_1k_generated_tokens, self.generated_tokens / 1000),
            (prices.per_1k_judge_prompt_tokens, self.judge_prompt_tokens / 1000),
            (prices.per_1k_judge_completion_tokens, self.judge_completion_tokens / 1000),
            (prices.per_cpu_hour, self.cpu_seconds / 3600),
            (prices.per_gpu_hour, self.gpu_seconds / 3600),
        ]
        priced = [price * amount for price, amount in parts if price is not None]
        return sum(priced) if priced else None


FIGURES = [f.name for f in fields(StageCost) if f.name != "stage"]


def record_stage_cost(lake: Lake, round_id: str, cost: StageCost) -> Path:
    """Write (or replace) the stage's row for the round."""
    return lake.write(
        STAGE_COSTS_TABLE, f"{round_id}.{cost.stage}", pd.DataFrame([{"round": round_id, **asdict(cost)}])
    )


def read_stage_costs(lake: Lake, round_id: str) -> list[StageCost]:
    """The cost of every stage recorded for the round (by stage name)."""
    partitions = [p for p in lake.partitions(STAGE_COSTS_TABLE) if p.startswith(f"{round_id}.")]
    rows = [row for p in partitions for row in lake.read(STAGE_COSTS_TABLE, p).to_dict("records")]
    return [_from_row(row) for row in rows]


def _from_row(row: dict) -> StageCost:
    # Plain ints and floats (not numpy's), so the figures serialize as numbers; a figure added later reads as 0.
    kinds = {f.name: f.type for f in fields(StageCost)}
    return StageCost(
        row["stage"], **{name: (int if kinds[name] == "int" else float)(row.get(name) or 0) for name in FIGURES}
    )


def total_cost(costs: list[StageCost], stage: str = "total") -> StageCost:
    """The figures summed over stages."""
    return StageCost(stage, **{name: sum(getattr(cost, name) for cost in costs) for name in FIGURES})

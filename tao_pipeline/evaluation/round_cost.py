"""What a round cost, per stage and in total, and per point of what it gained.

The stages record their own cost (:mod:`tao_pipeline.data.stage_costs`); the evaluation adds its
own and then sums the round. The gain is the observed difference on the held-out prompts: labeled
accuracy in percentage points where labels exist, else the win rate's points above 0.5 (a tie
with the champion). Cost per point of gain is "n/a" when the round gained nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.data.lake import Lake
from tao_pipeline.data.stage_costs import FIGURES, StageCost, read_stage_costs, total_cost
from tao_pipeline.evaluation.verdict import Verdict
from tao_pipeline.settings import CostSettings

SECTION = "## What this round cost"
STAGE_ORDER = (
    "preflight",
    "candidate_responses",
    "response_scores",
    "preference_pairs",
    "tuned_checkpoint",
    "control_checkpoint",
    "checkpoint_evaluation",
)
COLUMNS = {
    "generated_tokens": "generated tokens",
    "judge_calls": "judge calls",
    "judge_prompt_tokens": "judge prompt tokens",
    "judge_completion_tokens": "judge completion tokens",
    "cpu_seconds": "CPU s",
    "gpu_seconds": "GPU s",
    "wall_seconds": "wall s",
}
PER_POINT = ("generated_tokens", "judge_calls", "cpu_seconds", "gpu_seconds")
PRICE_SETTINGS = "costs.per_1k_generated_tokens, costs.per_cpu_hour, costs.per_gpu_hour, ..."


@dataclass(frozen=True)
class Gain:
    points: float | None  # None: no held-out outcome to measure it by
    basis: str  # what the points are of
    detail: str  # the measurements behind them

    @property
    def positive(self) -> bool:
        return self.points is not None and self.points > 0

    def describe(self) -> str:
        return "no gain measured" if self.points is None else f"{self.points:+.1f} points of {self.basis}"


def gain_of(verdict: Verdict) -> Gain:
    """Labeled accuracy's change in points where labels exist, else the win rate's points above 0.5."""
    before, after = verdict.champion_accuracy, verdict.challenger_accuracy
    if before is not None and after is not None:
        return Gain(100 * (after - before), "labeled accuracy", f"{before:.3f} -> {after:.3f}")
    if verdict.heldout and not math.isnan(verdict.win_rate):
        return Gain(100 * (verdict.win_rate - 0.5), "win rate above 0.5", f"win rate {verdict.win_rate:.3f}")
    return Gain(None, "win rate above 0.5", "no held-out prompt could be judged")


@dataclass(frozen=True)
class RoundCost:
    round_id: str
    stages: list[StageCost]  # in pipeline order
    gain: Gain
    prices: CostSettings

    @property
    def total(self) -> StageCost:
        return total_cost(self.stages)

    @property
    def money(self) -> float | None:
        return self.total.money(self.prices)

    def per_point(self) -> dict[str, float] | None:
        """Each total (and money, when priced) divided by the points gained; None without a gain."""
        if not self.gain.positive:
            return None
        totals = {name: float(getattr(self.total, name)) for name in PER_POINT}
        if self.money is not None:
            totals["money"] = self.money
        return {name: value / self.gain.points for name, value in totals.items()}

    def table(self) -> pd.DataFrame:
        """One row per stage and a total row; a money column when a price is set."""
        rows = []
        for cost in [*self.stages, self.total]:
            row = {"stage": cost.stage, **{COLUMNS[name]: _rounded(getattr(cost, name)) for name in FIGURES}}
            money = cost.money(self.prices)
            if money is not None:
                row[f"money ({self.prices.currency})"] = round(money, 4)
            rows.append(row)
        return pd.DataFrame(rows)

    def per_point_text(self) -> str:
        per_point = self.per_point()
        if per_point is None:
            return "n/a: no gain" if self.gain.points is not None else "n/a: no gain measured"
        parts = [f"{_number(per_point[name])} {COLUMNS[name]}" for name in PER_POINT]
        if "money" in per_point:
            parts.append(f"{per_point['money']:.4f} {self.prices.currency}")
        return ", ".join(parts)

    def markdown(self) -> str:
        money = self.money
        lines = [
            SECTION,
            "",
            self.table().to_markdown(index=False),
            "",
            "Each stage's latest materialization; work served from a cache (responses, scores, judge answers) "
            "cost nothing again.",
            "",
            f"**Gain:** {self.gain.describe()} ({self.gain.detail}), observed on the held-out prompts.",
            "",
            f"**Cost per point of gain:** {self.per_point_text()}.",
        ]
        if money is None:
            lines += ["", f"No prices set ({PRICE_SETTINGS}): no money shown."]
        return "\n".join(lines) + "\n"

    def registry_metrics(self) -> dict[str, float | str]:
        """The round's totals as the registry records them on the challenger (``cost_*``)."""
        metrics: dict[str, float | str] = {
            f"cost_{name}": _rounded(value) for name, value in self.total.figures().items()
        }
        if self.money is not None:
            metrics["cost_money"] = round(self.money, 4)
            metrics["cost_currency"] = self.prices.currency
        return metrics


def round_cost(lake: Lake, round_id: str, verdict: Verdict, prices: CostSettings) -> RoundCost:
    """The round's stage costs as recorded so far, in pipeline order, with the verdict's gain."""
    order = {stage: index for index, stage in enumerate(STAGE_ORDER)}
    stages = sorted(read_stage_costs(lake, round_id), key=lambda c: (order.get(c.stage, len(order)), c.stage))
    return RoundCost(round_id, stages, gain_of(verdict), prices)


def add_cost_section(report: Path, cost: RoundCost) -> None:
    """Append the cost section to the round's report, replacing one a previous evaluation wrote."""
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    kept = text.split(f"\n{SECTION}\n", 1)[0].rstrip("\n")
    with atomic_path(report) as staging:
        staging.write_text(f"{kept}\n\n{cost.markdown()}", encoding="utf-8")


def versions_with_costs(versions: pd.DataFrame) -> pd.DataFrame:
    """The registry's versions with their round's cost beside the metrics: tokens, CPU s, and money if any."""
    metrics = versions["metrics"].map(lambda text: json.loads(text) if isinstance(text, str) and text else {})
    columns = {
        "tokens": metrics.map(lambda m: _shown(m, "cost_generated_tokens", "{:.0f}")),
        "CPU s": metrics.map(lambda m: _shown(m, "cost_cpu_seconds", "{:.1f}")),
    }
    if metrics.map(lambda m: "cost_money" in m).any():
        columns["money"] = metrics.map(lambda m: _shown(m, "cost_money", "{:.4f} " + m.get("cost_currency", "")))
    position = versions.columns.get_loc("metrics") + 1
    shown = versions.copy()
    for offset, (name, values) in enumerate(columns.items()):
        shown.insert(position + offset, name, values)
    return shown


def _shown(metrics: dict, key: str, form: str) -> str:
    """The metric as text, '-' when the version has none."""
    return form.format(metrics[key]).strip() if metrics.get(key) is not None else "-"


def _rounded(value: float) -> float:
    return value if isinstance(value, int) else round(float(value), 1)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"

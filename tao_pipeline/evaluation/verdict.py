"""A round's verdict, computed once when it is evaluated and stored beside its evaluation rows.

- :func:`decide`: promote only when the challenger wins on the label-free score and no guard regresses;
- :func:`compare_control`: does the real run gain more than the control arm (random preference directions)?
- :class:`RoundVerdict`: both, plus the collapse guard's alerts, as one row of the ``evaluation_verdicts``
  table; the promotion check, the ``champion`` asset and the CLI all read this row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pandas as pd

from tao_pipeline.evaluation.tables import has_control, has_labels, mean_accuracy, win_rate
from tao_pipeline.settings import EvaluationSettings

VERDICTS_TABLE = "evaluation_verdicts"


@dataclass(frozen=True)
class Verdict:
    promote: bool
    win_rate: float
    champion_accuracy: float | None
    challenger_accuracy: float | None
    length_ratio: float
    reason: str


def decide(rows: pd.DataFrame, settings: EvaluationSettings) -> Verdict:
    """Promote only when the challenger wins on the label-free score and no guard regresses.

    Guards: labeled accuracy (where labels exist) may not drop by more than
    evaluation.max_accuracy_drop; mean response length may not grow past evaluation.max_length_ratio.
    """
    rate = win_rate(rows["outcome"])
    labeled = rows[rows["champion_correct"].notna()]
    champion_acc = float(labeled["champion_correct"].astype(float).mean()) if len(labeled) else None
    challenger_acc = float(labeled["challenger_correct"].astype(float).mean()) if len(labeled) else None
    ratio = float(rows["challenger_chars"].mean() / max(rows["champion_chars"].mean(), 1.0)) if len(rows) else 1.0
    facts = (rate, champion_acc, challenger_acc, ratio)
    if rate <= settings.min_win_rate:
        return Verdict(
            False, *facts, f"win rate {rate:.3f} does not exceed evaluation.min_win_rate={settings.min_win_rate}"
        )
    if champion_acc is not None and challenger_acc < champion_acc - settings.max_accuracy_drop:
        return Verdict(False, *facts, f"labeled accuracy fell {champion_acc:.3f} -> {challenger_acc:.3f}")
    if ratio > settings.max_length_ratio:
        return Verdict(
            False,
            *facts,
            f"responses grew {ratio:.2f}x longer (evaluation.max_length_ratio={settings.max_length_ratio})",
        )
    return Verdict(True, *facts, f"win rate {rate:.3f} > {settings.min_win_rate}, no guard regressed")


@dataclass(frozen=True)
class ControlVerdict:
    """Does the real run gain more than a run trained on random preference directions?"""

    enabled: bool
    measure: str  # "labeled accuracy" or "label-free win rate"
    tao_gain: float = 0.0
    control_gain: float = 0.0
    alarm: bool = False
    message: str = "control arm off (evaluation.control_arm=false)"


def compare_control(rows: pd.DataFrame, settings: EvaluationSettings) -> ControlVerdict:
    if not has_control(rows):
        return ControlVerdict(False, "")
    if has_labels(rows):
        measure = "labeled accuracy"
        baseline = mean_accuracy(rows["champion_correct"])
        tao, control = (
            mean_accuracy(rows["challenger_correct"]) - baseline,
            mean_accuracy(rows["control_correct"]) - baseline,
        )
    else:
        measure = "label-free win rate"
        tao, control = win_rate(rows["outcome"]) - 0.5, win_rate(rows["control_outcome"]) - 0.5
    alarm = control >= tao - settings.control_margin
    message = (
        f"CONTROL GAINS AS MUCH AS TAO: {measure} gain {control:+.3f} (random preference directions) vs "
        f"{tao:+.3f} (scored pairs); the improvement is not evidence that the scorer's signal helped"
        if alarm
        else f"TAO beats the control: {measure} gain {tao:+.3f} vs {control:+.3f} with random directions"
    )
    return ControlVerdict(True, measure, round(tao, 3), round(control, 3), alarm, message)


@dataclass(frozen=True)
class RoundVerdict:
    """Everything a round's evaluation concluded, as stored in the lake (one row per round)."""

    round: str
    champion_version: str
    challenger_version: str
    promotion: Verdict
    control: ControlVerdict
    collapse_alerts: list[str] = field(default_factory=list)
    evaluated_rounds: int = 1  # rounds the collapse guard looked at, this one included

    @property
    def promote(self) -> bool:
        return self.promotion.promote

    @property
    def warnings(self) -> list[str]:
        return ([self.control.message] if self.control.alarm else []) + self.collapse_alerts

    def registry_metrics(self) -> dict[str, float | None]:
        """What the model registry records about the challenger."""
        return {
            "heldout_win_rate": self.promotion.win_rate,
            "heldout_accuracy": self.promotion.challenger_accuracy,
            "parent_heldout_accuracy": self.promotion.champion_accuracy,
        }

    def to_frame(self) -> pd.DataFrame:
        record = {
            "round": self.round,
            "champion_version": self.champion_version,
            "challenger_version": self.challenger_version,
            **{f"promotion_{k}": v for k, v in asdict(self.promotion).items()},
            **{f"control_{k}": v for k, v in asdict(self.control).items()},
            "collapse_alerts": json.dumps(self.collapse_alerts),
            "evaluated_rounds": self.evaluated_rounds,
        }
        return pd.DataFrame([record])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> RoundVerdict:
        row = frame.iloc[0].to_dict()

        def part(prefix: str, kind: type) -> object:
            values = {name: _plain(row[f"{prefix}_{name}"]) for name in kind.__dataclass_fields__}
            return kind(**values)

        return cls(
            row["round"],
            row["champion_version"],
            row["challenger_version"],
            part("promotion", Verdict),
            part("control", ControlVerdict),
            json.loads(row["collapse_alerts"]),
            int(row["evaluated_rounds"]),
        )


def _plain(value):
    """A value read back from Parquet as the Python value it was written as (NaN -> None, numpy -> builtin)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value

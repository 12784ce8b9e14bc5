"""A round's verdict, computed once when it is evaluated and stored beside its evaluation rows.

- :func:`decide`: promote only when the challenger is proven better on the label-free score (an interval
  and a paired test, :mod:`.significance`) and no guard regresses;
- :func:`compare_control`: does the real run gain more than the control arm (random preference directions)?
- :class:`RoundVerdict`: both, plus the collapse guard's alerts, as one row of the ``evaluation_verdicts``
  table; the promotion check, the ``champion`` asset and the CLI all read this row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pandas as pd

from tao_pipeline.evaluation.significance import (
    AccuracyTest,
    Interval,
    accuracy_test,
    p_phrase,
    win_rate_heldout_needed,
    win_rate_test,
)
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
    # The evidence behind it (defaults: a verdict stored before these existed reads back without them).
    evidence: str = ""  # "significant", "not enough evidence", "below the bar", "guard", "no outcomes"
    heldout: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    confidence: float | None = None
    win_rate_low: float | None = None
    win_rate_high: float | None = None
    sign_test_p: float | None = None
    accuracy_difference_low: float | None = None
    accuracy_difference_high: float | None = None
    mcnemar_p: float | None = None
    heldout_needed: int | None = None  # prompts that would show the observed effect; set when not significant

    @property
    def win_rate_interval(self) -> Interval:
        return Interval(self.win_rate_low, self.win_rate_high, self.confidence or 0.0)

    @property
    def not_enough_evidence(self) -> bool:
        return self.evidence == NOT_ENOUGH_EVIDENCE


SIGNIFICANT, NOT_ENOUGH_EVIDENCE = "significant", "not enough evidence"


def decide(rows: pd.DataFrame, settings: EvaluationSettings) -> Verdict:
    """Promote only when the challenger is proven better on the label-free score and no guard regresses.

    Proven: the lower end of the win rate's bootstrap interval at evaluation.confidence clears
    evaluation.min_win_rate and, for a bar of 0.5 or more, the one-sided sign test of wins against
    losses rejects "no better" at the same error rate. Guards: labeled accuracy (where labels exist)
    may not drop by more than evaluation.max_accuracy_drop; mean response length may not grow past
    evaluation.max_length_ratio. A challenger that is ahead but not proven keeps the champion with
    "not enough evidence"; it is not a failure.
    """
    confidence, bar = settings.confidence, settings.min_win_rate
    test = win_rate_test(rows["outcome"].dropna(), confidence)
    accuracy = accuracy_test(rows["champion_correct"], rows["challenger_correct"], confidence)
    ratio = float(rows["challenger_chars"].mean() / max(rows["champion_chars"].mean(), 1.0)) if len(rows) else 1.0
    facts = {
        "win_rate": test.win_rate,
        "champion_accuracy": accuracy.champion if accuracy else None,
        "challenger_accuracy": accuracy.challenger if accuracy else None,
        "length_ratio": ratio,
        "heldout": test.n,
        "wins": test.wins,
        "losses": test.losses,
        "ties": test.ties,
        "confidence": confidence,
        "win_rate_low": test.interval.low,
        "win_rate_high": test.interval.high,
        "sign_test_p": test.sign_test_p,
        "accuracy_difference_low": accuracy.difference_interval.low if accuracy else None,
        "accuracy_difference_high": accuracy.difference_interval.high if accuracy else None,
        "mcnemar_p": accuracy.mcnemar_p if accuracy else None,
    }
    win = f"win rate {test.win_rate:.3f} {test.interval} at {test.interval.percent} ({test.counts()})"

    def refuse(evidence: str, reason: str, **extra) -> Verdict:
        return Verdict(False, reason=reason, evidence=evidence, **facts, **extra)

    if test.n == 0:
        return refuse("no outcomes", "no held-out prompt could be judged (every score was unknown)")
    if test.win_rate <= bar:
        return refuse("below the bar", f"{win} does not exceed evaluation.min_win_rate={bar}")
    if accuracy and accuracy.challenger < accuracy.champion - settings.max_accuracy_drop:
        return refuse("guard", f"labeled accuracy fell: {_accuracy_summary(accuracy)}")
    if ratio > settings.max_length_ratio:
        return refuse(
            "guard", f"responses grew {ratio:.2f}x longer (evaluation.max_length_ratio={settings.max_length_ratio})"
        )
    alpha = (1 - confidence) / 2  # the lower end of a two-sided interval is a one-sided bound at this error
    sign_test_applies = bar >= 0.5
    if test.interval.low is None or test.interval.low <= bar or (sign_test_applies and test.sign_test_p > alpha):
        needed = win_rate_heldout_needed(test, bar, confidence)
        return refuse(
            NOT_ENOUGH_EVIDENCE,
            f"not enough evidence (n = {test.n}, {win}, sign test {p_phrase(test.sign_test_p)}): "
            f"the interval must clear evaluation.min_win_rate={bar}; about {needed} held-out prompts would show "
            f"a win rate of {max(test.win_rate, bar + 0.05):.2f}. The champion stays",
            heldout_needed=needed,
        )
    reason = f"{win} clears evaluation.min_win_rate={bar}"
    if sign_test_applies:
        reason += f" (sign test {p_phrase(test.sign_test_p)})"
    if accuracy:
        reason += f"; labeled accuracy {_accuracy_summary(accuracy)}"
    return Verdict(True, reason=reason + "; no guard regressed", evidence=SIGNIFICANT, **facts)


def _accuracy_summary(accuracy: AccuracyTest) -> str:
    return (
        f"{accuracy.champion:.3f} -> {accuracy.challenger:.3f}, difference {accuracy.difference:+.3f} "
        f"{accuracy.difference_interval} (McNemar {p_phrase(accuracy.mcnemar_p)}, n = {accuracy.n})"
    )


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
    champion_collapse: str = ""  # the collapse alert that implicates the round's starting model, if any

    @property
    def promote(self) -> bool:
        return self.promotion.promote

    @property
    def warnings(self) -> list[str]:
        return ([self.control.message] if self.control.alarm else []) + self.collapse_alerts

    def registry_metrics(self) -> dict[str, float | str | None]:
        """What the model registry records about the challenger, and which champion it was compared with."""
        return {
            "heldout_champion": self.champion_version,
            "heldout_evidence": self.promotion.evidence,
            "heldout_win_rate": self.promotion.win_rate,
            "heldout_win_rate_low": self.promotion.win_rate_low,
            "heldout_win_rate_high": self.promotion.win_rate_high,
            "heldout_prompts": self.promotion.heldout,
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
            "champion_collapse": self.champion_collapse,
        }
        return pd.DataFrame([record])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> RoundVerdict:
        row = frame.iloc[0].to_dict()

        def part(prefix: str, kind: type) -> object:
            # A field added after the row was written keeps its default.
            values = {
                name: _plain(row[f"{prefix}_{name}"]) for name in kind.__dataclass_fields__ if f"{prefix}_{name}" in row
            }
            return kind(**values)

        return cls(
            row["round"],
            row["champion_version"],
            row["challenger_version"],
            part("promotion", Verdict),
            part("control", ControlVerdict),
            json.loads(row["collapse_alerts"]),
            int(row["evaluated_rounds"]),
            _plain(row.get("champion_collapse")) or "",
        )


def _plain(value):
    """A value read back from Parquet as the Python value it was written as (NaN -> None, numpy -> builtin)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value

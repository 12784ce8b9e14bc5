"""The round's report: ``<home>/reports/<round>/report.md`` with its plots beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.evaluation.significance import p_phrase
from tao_pipeline.evaluation.tables import summarize, tuned_vs_sampling_table
from tao_pipeline.evaluation.verdict import ControlVerdict, Verdict

DEFAULT_CONFIDENCE = 0.95  # for a verdict stored before intervals existed


def write_round_report(
    folder: Path,
    round_id: str,
    rows: pd.DataFrame,
    verdict: Verdict,
    control: ControlVerdict,
    history: pd.DataFrame,
    alerts: list[str],
    plots: dict[str, bytes],
    feedback: pd.DataFrame | None = None,
    cautions: Sequence[str] = (),
) -> Path:
    """<folder>/report.md with the plots beside it; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (folder / f"{name}.png").write_bytes(png)
    lines = [
        f"# TAO {round_id}",
        "",
        f"**Verdict:** {'promoted' if verdict.promote else 'not promoted'}: {verdict.reason}",
        "",
        *[line for caution in cautions for line in (f"**Caution:** {caution}", "")],
        f"**Control arm:** {control.message}",
        "",
        "**Collapse guard:** " + ("; ".join(alerts) if alerts else "no round where reward rose while accuracy fell"),
        "",
        f"## Champion vs challenger (held-out, {_percent(verdict)} intervals)",
        "",
        _evidence(verdict),
        "",
        _markdown(summarize(rows, verdict.confidence or DEFAULT_CONFIDENCE)),
        "",
    ]
    test_time = tuned_vs_sampling_table(rows, verdict.confidence or DEFAULT_CONFIDENCE)
    if len(test_time) and test_time["base maj@k"].notna().any():
        k = int(rows["k"].iloc[0])
        lines += [
            f"## Test-time compute: base model with k={k} samples vs one tuned greedy pass",
            "",
            _markdown(test_time),
            "",
        ]
    if len(history):
        lines += ["## Rounds so far", "", _markdown(history), ""]
    if feedback is not None and len(feedback):
        lines += [
            "## Users' feedback per model version (from the logs: never part of the held-out comparison)",
            "",
            _markdown(feedback),
            "",
        ]
    lines += [f"![{name}]({name}.png)" for name in plots]
    path = folder / "report.md"
    with atomic_path(path) as staging:
        staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _percent(verdict: Verdict) -> str:
    return f"{verdict.confidence or DEFAULT_CONFIDENCE:.0%}"


def _evidence(verdict: Verdict) -> str:
    """The paired evidence in one paragraph: counts, the win rate's interval and test, McNemar where labeled."""
    if not verdict.heldout:
        return "No held-out prompt could be judged."
    text = (
        f"**Evidence:** {verdict.heldout} held-out prompts: {verdict.wins} wins, {verdict.losses} losses, "
        f"{verdict.ties} ties; win rate {verdict.win_rate:.3f} {verdict.win_rate_interval}, one-sided sign test "
        f"{p_phrase(verdict.sign_test_p)}."
    )
    if verdict.mcnemar_p is not None:
        text += (
            f" Labeled accuracy {verdict.champion_accuracy:.3f} -> {verdict.challenger_accuracy:.3f}, difference "
            f"[{verdict.accuracy_difference_low:+.3f}, {verdict.accuracy_difference_high:+.3f}], McNemar "
            f"{p_phrase(verdict.mcnemar_p)}."
        )
    if verdict.heldout_needed:
        text += f" About **{verdict.heldout_needed} held-out prompts** would show this effect."
    return text


def _markdown(table: pd.DataFrame) -> str:
    shown = table.dropna(axis=1, how="all")
    return shown.astype(object).where(shown.notna(), "-").to_markdown(index=False)

"""The round report's live section: how the round's challenger did on live traffic, kept up to date in
``<reports>/<round>/report.md`` when the experiment starts and when the live decision ends it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.policy import live_status

HEADING = "## On live traffic"


def live_section(store: ModelStore, version_id: str, history: pd.DataFrame | None = None) -> str:
    """The section for ``version_id``: where it stands, and the evidence its last experiment ended on."""
    history = store.live_history() if history is None else history
    mine = history[history["version_id"] == version_id]
    lines = [HEADING, "", f"**{version_id}:** {live_status(store, version_id, history)}", ""]
    if mine.empty:
        return "\n".join(lines)
    if len(mine) > 1:
        stages = mine[["mode", "share", "started_at", "ended_at", "outcome"]].astype(object)
        lines += [stages.where(stages.notna(), "-").to_markdown(index=False), ""]
    last = mine.iloc[-1]
    if pd.isna(last["ended_at"]):
        lines += ["The evidence so far: `tao live`; the decision is taken by `live_decision_sensor`.", ""]
        return "\n".join(lines)
    evidence = json.loads(last["evidence"] or "{}")
    if "n" in evidence:
        lines += [
            f"**Decision:** {evidence.get('decision', last['outcome'])} after {evidence['n']} paired answers "
            f"({evidence.get('metric', '?')}): {evidence.get('reason', '')}",
            "",
        ]
    if evidence.get("arms"):
        lines += [pd.DataFrame(evidence["arms"]).to_markdown(index=False), ""]
    return "\n".join(lines)


def update_round_report(report: Path, section: str) -> bool:
    """Put ``section`` in the report, replacing an earlier live section; False when the round has no report."""
    if not report.is_file():
        return False
    lines = report.read_text(encoding="utf-8").splitlines()
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "!["))), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("![")), len(lines))
    updated = [*lines[:start], *section.rstrip("\n").splitlines(), "", *lines[end:]]
    with atomic_path(report) as staging:
        staging.write_text("\n".join(updated).rstrip("\n") + "\n", encoding="utf-8")
    return True


def refresh_live_report(
    store: ModelStore, reports_dir: Path, version_id: str, history: pd.DataFrame | None = None
) -> Path | None:
    """Rewrite the live section of the report of the round that made ``version_id``; its path, or None."""
    round_id = store.get(version_id).round
    if round_id is None:
        return None
    report = Path(reports_dir) / round_id / "report.md"
    return report if update_round_report(report, live_section(store, version_id, history)) else None


def report_last_ending(store: ModelStore, reports_dir: Path, seen: str | None) -> str | None:
    """Refresh the report of the round whose challenger's experiment ended last, unless that ending is
    ``seen``; returns the ending's key (changes with every ending), None before any ended."""
    history = store.live_history()
    ended = history[history["ended_at"].notna()]
    if ended.empty:
        return None
    last = ended.sort_values("ended_at").iloc[-1]
    key = f"{last['version_id']}@{last['ended_at']}"
    if key != seen:
        refresh_live_report(store, reports_dir, last["version_id"], history)
    return key

"""What the offline gate's verdict does: promote the challenger, or (``live.enabled``) put it on live traffic."""

from __future__ import annotations

from tao_pipeline.live.report import refresh_live_report
from tao_pipeline.registry import ModelStore, ModelVersion
from tao_pipeline.registry.policy import apply_verdict, live_status
from tao_pipeline.settings import TaoSettings


def apply_gate_verdict(
    store: ModelStore,
    settings: TaoSettings,
    round_id: str,
    challenger: str,
    promote: bool,
    reason: str,
    champion_collapse: str | None,
) -> tuple[ModelVersion, str]:
    """The champion afterwards, and one line on the challenger's time on live traffic ("no" if none);
    the round's report gains its live section when the challenger went live."""
    current = apply_verdict(
        store, settings.model, round_id, challenger, promote, reason,
        champion_collapse=champion_collapse, live=settings.live,
    )  # fmt: skip
    history = store.live_history()
    live = live_status(store, challenger, history)
    if live != "no":
        refresh_live_report(store, settings.reports_dir, challenger, history)
    return current, live

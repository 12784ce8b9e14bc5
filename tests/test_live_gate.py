"""live.enabled: a challenger that passes the offline gate goes on live traffic instead of to every user;
the round's report says how it does there; `tao serve`'s error guard rolls back a failing challenger at once."""

import asyncio
import json

import pytest

from tao_pipeline.common.confidence_sequence import RunningBounds
from tao_pipeline.live.evidence import _act
from tao_pipeline.live.gate import apply_gate_verdict
from tao_pipeline.live.report import HEADING, report_last_ending, update_round_report
from tao_pipeline.registry import ModelStore
from tao_pipeline.serving.live import CANARY, CHAMPION, SHADOW, FailurePairs, LiveRouter, error_guard
from tao_pipeline.settings import LiveSettings
from tests.serve_helpers import load, register_checkpoint, serve_config

CHALLENGER = "round-0001-dpo-live"


@pytest.fixture
def gated(tmp_path, tiny_model_dir):
    """A home with a champion, a round's challenger, and the round's report as evaluation writes it."""
    settings = load(serve_config(tmp_path, tiny_model_dir), "live.enabled=true", "live.share=0.25")
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model, log=lambda _: None).version_id
    register_checkpoint(settings, tiny_model_dir, CHALLENGER, parent=champion)
    report = settings.reports_dir / "round-0001" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# TAO round-0001\n\n## Rounds so far\n\n| a |\n|---|\n| 1 |\n\n![curve](curve.png)\n")
    return settings, store, champion, report


def _gate(settings, store, promote=True):
    return apply_gate_verdict(store, settings, "round-0001", CHALLENGER, promote, "win rate 0.70", None)


def test_a_challenger_that_passes_the_gate_goes_on_canary_once_and_the_report_follows_it(gated):
    settings, store, champion, report = gated
    current, live = _gate(settings, store)
    assert current.version_id == champion  # not promoted yet: live evidence decides
    experiment = store.live_experiment()
    assert (experiment.version_id, experiment.mode, experiment.share) == (CHALLENGER, "canary", 0.25)
    assert live.startswith(f"canary beside {champion}, share 0.25 since ") and "rolls it back" in live
    text = report.read_text()
    assert text.index(HEADING) < text.index("![curve]") and text.index("## Rounds so far") < text.index(HEADING)
    assert "`tao live`" in text

    # A rerun of the round's last step neither starts a second experiment nor restarts an ended one.
    _gate(settings, store)
    assert len(store.live_history()) == 1
    evidence = {"decision": "roll back", "n": 60, "metric": "feedback", "reason": "proven worse by more than 0.02",
                "arms": [{"arm": "canary", "answers": 60}, {"arm": "champion", "answers": 180}]}  # fmt: skip
    store.end_live("rolled back", evidence)
    current, live = _gate(settings, store)
    assert current.version_id == champion and store.live_experiment() is None and len(store.live_history()) == 1
    assert live.endswith(": rolled back")

    # The sensor's refresh after an ending it has not seen: the section is replaced, not repeated.
    key = report_last_ending(store, settings.reports_dir, seen=None)
    assert key.startswith(f"{CHALLENGER}@")
    text = report.read_text()
    assert text.count(HEADING) == 1 and "**Decision:** roll back after 60 paired answers (feedback)" in text
    assert "| canary   |        60 |" in text and "`tao live`" not in text
    assert text.rstrip().endswith("![curve](curve.png)")
    assert report_last_ending(store, settings.reports_dir, seen=key) == key


def test_without_live_a_passing_challenger_is_promoted_and_a_refused_one_never_goes_live(gated):
    settings, store, champion, report = gated
    current, live = _gate(settings, store, promote=False)
    assert current.version_id == champion and live == "no" and store.live_experiment() is None
    assert HEADING not in report.read_text()
    current, live = _gate(settings.model_copy(update={"live": LiveSettings()}), store)
    assert current.version_id == CHALLENGER and live == "no" and store.live_experiment() is None


def test_shadow_then_canary_a_passed_stage_starts_the_next_and_the_last_promotes(gated):
    settings, store, champion, report = gated
    staged = settings.model_copy(update={"live": LiveSettings(enabled=True, stages=["shadow", "canary"], share=0.3)})
    _gate(staged, store)
    assert store.live_experiment().mode == "shadow"
    experiment = store.live_experiment()
    passed = {"decision": "promote", "n": 50, "reason": "proven no worse than -0.02"}
    assert _act(staged, store, experiment, True, passed) == f"{CHALLENGER} passed its shadow: now canary"
    canary = store.live_experiment()
    assert (canary.mode, canary.share, canary.champion_version) == ("canary", 0.3, champion)
    assert store.champion_id() == champion and list(store.promotions()["action"])[-2:] == ["shadow", "canary"]
    text = report.read_text()
    assert "| shadow |" in text and "passed shadow" in text and "`tao live`" in text
    assert _act(staged, store, canary, True, passed) == f"{CHALLENGER} is the champion"
    assert store.champion_id() == CHALLENGER and store.live_experiment() is None
    assert list(store.live_history()["outcome"]) == ["passed shadow", "promoted"]


def test_a_rolled_back_shadow_never_reaches_users_and_a_missing_report_is_not_made(gated):
    settings, store, champion, report = gated
    report.unlink()
    staged = settings.model_copy(update={"live": LiveSettings(enabled=True, stages=["shadow", "canary"])})
    _gate(staged, store)
    worse = {"decision": "roll back", "n": 50, "reason": "proven worse by more than 0.02"}
    assert "rolled back" in _act(staged, store, store.live_experiment(), False, worse)
    assert list(store.live_history()["mode"]) == ["shadow"] and store.champion_id() == champion
    assert not report.exists() and not update_round_report(report, f"{HEADING}\n")


@pytest.mark.parametrize("stages", [[], ["canary", "shadow"], ["canary", "canary"], ["both"]])
def test_live_stages_are_checked_when_settings_load(stages):
    with pytest.raises(ValueError, match="stages|shadow"):
        LiveSettings(stages=stages)


def _pairs(*sequence: tuple[str, bool]) -> FailurePairs:
    pairs = FailurePairs()
    for arm, failed in sequence:
        pairs.add(arm, failed)
    return pairs


def test_failures_are_paired_with_the_other_arms_request_next_in_time():
    pairs = _pairs(
        (CHAMPION, False), (CHAMPION, True), (CANARY, True), (CANARY, False), (CANARY, True), (CHAMPION, False)
    )  # fmt: skip
    # (champion failed, canary failed): 0, then (canary failed, champion ok): +1
    assert pairs.pairs == 2 and pairs.counts == {CHAMPION: [3, 1], CANARY: [3, 2]}
    reference = RunningBounds(0.05)
    for difference in (0, 1):
        reference.add(difference)
    assert (pairs.bounds.low, pairs.bounds.high) == (reference.low, reference.high)


def _rounds(n: int, canary, champion, arm: str = CANARY) -> list[tuple[str, bool]]:
    """n requests of each arm, alternating; canary(i) / champion(i): whether the i-th one fails."""
    return [event for i in range(n) for event in ((arm, canary(i)), (CHAMPION, champion(i)))]


@pytest.mark.parametrize(
    ("sequence", "tripped"),
    [
        (_rounds(20, lambda i: True, lambda i: False), True),  # every canary request fails, no champion one
        (_rounds(10, lambda i: True, lambda i: False), False),  # too few pairs to be sure (16 are enough)
        (_rounds(200, lambda i: True, lambda i: True), False),  # an outage: both fail
        (_rounds(400, lambda i: i % 10 == 0, lambda i: False), False),  # 10% against 0%: not proven above 5%
        (_rounds(400, lambda i: i % 2 == 0, lambda i: i % 10 == 0, SHADOW), True),  # 50% against 10%
    ],
)
def test_the_error_guard(sequence, tripped):
    pairs = _pairs(*sequence)
    reason = error_guard(pairs, LiveSettings())
    assert (reason is not None) == tripped, (pairs.counts, pairs.bounds.low)
    if tripped:
        assert reason.startswith("error guard: the challenger fails more often") and "max_error_rate=0.05" in reason


class _Engine:
    """A challenger engine that starts (the guard counts what the server saw; answering is the app's part)."""

    async def start(self, version) -> None:
        self.version = version.version_id

    def status(self) -> dict:
        return {}

    async def close(self) -> None:
        pass


def test_the_server_rolls_a_failing_canary_back_at_once_in_the_registry(gated):
    settings, store, champion, report = gated
    store.start_live(CHALLENGER, "canary", 0.5)

    async def serve_and_fail() -> LiveRouter:
        router = LiveRouter(store, _Engine, poll_seconds=0.1, guard=LiveSettings())
        await router.check_now()
        assert router.active
        for i in range(100):  # one in two canary requests fails, one in twenty champion ones
            router.answered(CANARY, failed=i % 2 == 0)
            router.answered(CHAMPION, failed=i % 20 == 0)
        for _ in range(100):
            if store.live_experiment() is None and router.experiment is None:
                return router
            await asyncio.sleep(0.05)
        raise AssertionError(router.status())

    router = asyncio.run(serve_and_fail())
    assert router.challenger is None and router.experiment is None
    [ended] = store.live_history().to_dict("records")
    assert ended["outcome"] == "rolled back"
    evidence = json.loads(ended["evidence"])
    assert evidence["reason"].startswith("error guard: the challenger fails more often than the champion by at least")
    requests, failures = evidence["requests_and_failures"][CANARY]
    assert failures == (requests + 1) // 2 and evidence["n"] < 100  # it stopped as soon as it was proven
    assert store.champion_id() == champion
    assert "error guard" in store.promotions()["reason"].iloc[-1]

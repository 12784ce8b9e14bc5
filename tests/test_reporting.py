"""Plots, the round history, the collapse guard, the markdown report and the review of a round."""

import json

import pandas as pd

from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation import ControlVerdict, Verdict, collapse_alerts, review_round, round_history
from tao_pipeline.evaluation.plots import (
    accuracy_per_round_plot,
    accuracy_per_task_plot,
    score_distribution_plot,
    training_curves_plot,
)
from tao_pipeline.evaluation.report import write_round_report
from tao_pipeline.settings import load_settings
from tests.test_evaluation import _labeled

PNG = b"\x89PNG"


def history(*rounds) -> pd.DataFrame:
    columns = ["round", "train_reward", "reward_before", "reward_after", "accuracy_before", "accuracy_after"]
    return pd.DataFrame(rounds, columns=columns)


def test_no_alert_when_reward_and_accuracy_rise_together():
    assert collapse_alerts(history(("r1", 0.5, 0.5, 0.6, 0.3, 0.4), ("r2", 0.6, 0.5, 0.6, 0.4, 0.5))) == []


def test_alert_when_reward_rises_while_accuracy_falls_within_a_round():
    [alert] = collapse_alerts(history(("r1", 0.5, 0.50, 0.70, 0.40, 0.30)))
    assert alert.startswith("r1: reward rose 0.500 -> 0.700") and "accuracy fell 0.400 -> 0.300" in alert


def test_alert_across_rounds_on_the_starting_models_own_reward():
    alerts = collapse_alerts(history(("r1", 0.50, 0.5, 0.5, 0.40, 0.40), ("r2", 0.65, 0.5, 0.5, 0.35, 0.35)))
    assert alerts == [
        "r1 -> r2: the starting model's own-sample reward rose 0.500 -> 0.650 while its held-out "
        "accuracy fell 0.400 -> 0.350"
    ]


def test_no_alert_without_labels_or_within_noise():
    assert collapse_alerts(history(("r1", 0.5, 0.5, 0.9, None, None))) == []
    assert collapse_alerts(history(("r1", 0.5, 0.5, 0.502, 0.4, 0.398))) == []


def test_round_history_reads_every_evaluated_round(tmp_path):
    lake = Lake(tmp_path)
    for round_id, after in [("round-0001", [True, True, False, False]), ("round-0002", [True, True, True, False])]:
        rows = _labeled(
            champion_correct=[True, False, False, False],
            challenger_correct=after,
            base_greedy_correct=[True, False, False, False],
            base_majority_correct=[True, True, False, False],
        )
        rows["champion_version"], rows["challenger_version"] = "base", f"{round_id}-dpo"
        lake.write("checkpoint_evaluation", round_id, rows.assign(round=round_id))
        lake.write("response_scores", round_id, pd.DataFrame({"score": [0.25, 0.75], "task": ["a", "a"]}))
    table = round_history(lake)
    assert table["round"].tolist() == ["round-0001", "round-0002"]
    assert table["accuracy_after"].tolist() == [0.5, 0.75] and table["train_reward"].tolist() == [0.5, 0.5]
    assert table["base_majority_accuracy"].tolist() == [0.5, 0.5]


def test_plots_are_pngs_and_the_report_links_them(tmp_path):
    rows = _labeled(
        champion_correct=[True, False, False, False],
        challenger_correct=[True, True, False, True],
        base_greedy_correct=[True, False, False, False],
        base_majority_correct=[True, True, False, False],
        base_best_of_k_correct=[True, True, True, False],
        k=[8] * 4,
    )
    scores = pd.DataFrame({"task": ["arithmetic", "short_answer"] * 5, "score": [i / 10 for i in range(10)]})
    log = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.2 * s} for s in range(1, 5)]
    table = pd.DataFrame({"round": ["r1", "r2"], "base_greedy_accuracy": [0.3, 0.3], "accuracy_after": [0.4, 0.5]})
    plots = {
        "score_distribution": score_distribution_plot(scores),
        "training_curves": training_curves_plot(log),
        "accuracy_per_task": accuracy_per_task_plot(rows),
        "accuracy_per_round": accuracy_per_round_plot(table),
    }
    assert all(png.startswith(PNG) and len(png) > 5_000 for png in plots.values())
    verdict = Verdict(True, 0.75, 0.25, 0.75, 0.9, "win rate 0.750 > 0.5, no guard regressed")
    report = write_round_report(tmp_path / "r1", "r1", rows, verdict, ControlVerdict(False, ""), table, [], plots)
    text = report.read_text()
    assert "# TAO r1" in text and "promoted" in text and "base maj@k" in text and "k=8" in text
    for name in plots:
        assert f"![{name}]({name}.png)" in text and (tmp_path / "r1" / f"{name}.png").read_bytes().startswith(PNG)
    assert "**Caution:**" not in text
    cautioned = write_round_report(
        tmp_path / "r2", "r2", rows, verdict, ControlVerdict(False, ""), table, [], {}, cautions=["vote alone"]
    ).read_text()
    assert "**Verdict:** promoted" in cautioned and "**Caution:** vote alone" in cautioned
    assert cautioned.index("**Verdict:**") < cautioned.index("**Caution:**") < cautioned.index("**Control arm:**")


def test_review_round_gives_the_verdict_the_collapse_warning_the_plots_and_the_report(tmp_path):
    settings = load_settings(overrides=[f"home='{tmp_path}'"])
    lake = Lake(settings.lake_dir)
    # The scorer prefers every tuned answer while labeled accuracy halves: reward hacking.
    rows = _labeled(champion_correct=[True, True, False, False], challenger_correct=[True, False, False, False])
    rows["champion_version"], rows["challenger_version"] = "base", "round-0001-dpo"
    lake.write("checkpoint_evaluation", "round-0001", rows.assign(round="round-0001"))
    log = json.dumps([{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.2 * s} for s in range(1, 4)])
    lake.write("tuned_checkpoint", "round-0001", pd.DataFrame({"version_id": ["round-0001-dpo"], "log_history": [log]}))

    review = review_round(lake, "round-0001", rows, settings)

    assert review.verdict.win_rate == 1.0 and not review.verdict.promote  # the accuracy guard refuses it
    assert review.history["round"].tolist() == ["round-0001"]
    [alert] = review.alerts
    assert alert.startswith("round-0001: reward rose") and review.warnings == [alert]  # control arm off: no alarm
    assert set(review.plots) == {"training_curves", "accuracy_per_task", "accuracy_per_round"}  # no scores stored
    assert review.report == settings.reports_dir / "round-0001" / "report.md"
    text = review.report.read_text()
    assert "not promoted" in text and alert in text and "![training_curves](training_curves.png)" in text

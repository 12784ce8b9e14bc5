"""Challenger vs champion on held-out prompts, under the same label-free scorer (and labels, if any).

Label-free win rate: for each held-out prompt both models answer greedily; both answers are
scored by the round's composite scorer against a reference pool of samples drawn from both
models, so neither model's own habits decide the consensus. Labels, when configured, only
feed the accuracy columns here; scoring, pairing and training never see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.generation import SamplingParams, build_generator
from tao_pipeline.scoring import PromptContext, prompt_constraints
from tao_pipeline.scoring.extractors import answer_matches
from tao_pipeline.settings import EvaluationSettings, TaoSettings

SIDES = ("champion", "challenger")
_PER_SIDE = ("version", "response", "answer", "score", "chars", "correct")
EVALUATION_COLUMNS = ["prompt_id", "task", "prompt", "outcome",
                      *(f"{side}_{field}" for side in SIDES for field in _PER_SIDE)]


@dataclass(frozen=True)
class Contender:
    version_id: str
    path: Path | str


def _responses(contender: Contender, heldout: pd.DataFrame, settings: TaoSettings, progress: bool):
    generator = build_generator(contender.path, contender.version_id, settings.generation, settings.model)
    greedy = generator.generate(
        heldout, SamplingParams(1, settings.evaluation.max_new_tokens, greedy=True), progress=progress
    )
    pool = generator.generate(heldout, SamplingParams(
        settings.evaluation.pool_samples, settings.evaluation.max_new_tokens,
        temperature=settings.generation.temperature, top_p=settings.generation.top_p,
        seed=settings.generation.seed + 1,
    ), progress=progress)
    close = getattr(generator, "close", None)
    if close is not None:
        close()  # a vLLM engine holds GPU memory until shut down; the challenger's comes next
    return greedy.set_index("prompt_id")["response"], pool.groupby("prompt_id")["response"].apply(list)


def evaluate(
    heldout: pd.DataFrame, champion: Contender, challenger: Contender, scorer, labels: dict[str, list[str]],
    settings: TaoSettings, progress: bool = True,
) -> pd.DataFrame:
    """One row per held-out prompt: both greedy answers, their scores, the outcome and label checks."""
    champion_greedy, champion_pool = _responses(champion, heldout, settings, progress)
    challenger_greedy, challenger_pool = _responses(challenger, heldout, settings, progress)
    rows = []
    for prompt in heldout.itertuples():
        context = PromptContext(prompt.prompt, prompt.task, prompt.system, prompt_constraints(prompt._asdict()))
        answers = [champion_greedy[prompt.prompt_id], challenger_greedy[prompt.prompt_id]]
        group = answers + champion_pool[prompt.prompt_id] + challenger_pool[prompt.prompt_id]
        scores = scorer.score(context, group).scores
        extracted = scorer.answers(context, answers)
        accepted = labels.get(prompt.prompt.strip())
        extractor = scorer.consistency.extractor(prompt.task)
        row = {"prompt_id": prompt.prompt_id, "task": prompt.task, "prompt": prompt.prompt,
               "outcome": _outcome(scores[1], scores[0])}
        for i, side in enumerate(SIDES):
            row[f"{side}_version"] = (champion, challenger)[i].version_id
            row[f"{side}_response"] = answers[i]
            row[f"{side}_answer"] = extracted[i]
            row[f"{side}_score"] = scores[i]
            row[f"{side}_chars"] = len(answers[i])
            row[f"{side}_correct"] = (
                answer_matches(extracted[i], accepted, extractor, prompt.prompt) if accepted else None
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=EVALUATION_COLUMNS)


def _outcome(challenger_score: float, champion_score: float) -> str:
    if abs(challenger_score - champion_score) < 1e-9:
        return "tie"
    return "win" if challenger_score > champion_score else "loss"


def win_rate(outcomes: pd.Series) -> float:
    if outcomes.empty:
        return 0.0
    return float(((outcomes == "win").sum() + 0.5 * (outcomes == "tie").sum()) / len(outcomes))


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """The before/after table: one row per metric (overall and per task), champion vs challenger."""
    table = []
    for task, subset in [("all", rows), *sorted(rows.groupby("task"))]:
        table.append(_metric_row(f"label-free score ({task})", subset, "score"))
        if subset["champion_correct"].notna().any():
            table.append(_metric_row(f"labeled accuracy ({task})", subset, "correct"))
        table.append({"metric": f"challenger win rate ({task})", "champion": None,
                      "challenger": round(win_rate(subset["outcome"]), 3), "n": len(subset)})
    table.append(_metric_row("mean response chars", rows, "chars"))
    return pd.DataFrame(table, columns=["metric", "champion", "challenger", "n"])


def _metric_row(metric: str, rows: pd.DataFrame, column: str) -> dict:
    values = {side: rows[f"{side}_{column}"].dropna().astype(float) for side in SIDES}
    return {"metric": metric, **{side: round(float(v.mean()), 3) if len(v) else None for side, v in values.items()},
            "n": len(values["champion"])}


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
        return Verdict(False, *facts, f"win rate {rate:.3f} does not exceed evaluation.min_win_rate={settings.min_win_rate}")
    if champion_acc is not None and challenger_acc < champion_acc - settings.max_accuracy_drop:
        return Verdict(False, *facts, f"labeled accuracy fell {champion_acc:.3f} -> {challenger_acc:.3f}")
    if ratio > settings.max_length_ratio:
        return Verdict(False, *facts, f"responses grew {ratio:.2f}x longer (evaluation.max_length_ratio={settings.max_length_ratio})")
    return Verdict(True, *facts, f"win rate {rate:.3f} > {settings.min_win_rate}, no guard regressed")
